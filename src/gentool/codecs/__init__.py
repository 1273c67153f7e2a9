"""Weight codecs, pure functions from float weights to stored codes and back: gentool's int8/int4/NF4/FP8
(`quant`), llama.cpp's GGML block formats with their per-tensor mixes (`ggml`, `ggml_mixes`), and llama.cpp's
importance-matrix files (`imatrix`)."""
