from gentool.cli import main

main()
