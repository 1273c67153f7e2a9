"""Artifacts: directories with a manifest.json, written atomically and validated on read."""

from gentool.artifacts.kinds import KINDS, format_name, kind_of
from gentool.artifacts.manifest import MANIFEST, Manifest, canonical_json, content_id, fingerprint, parse_manifest
from gentool.artifacts.probe import MASKED_LM, Probe, probe
from gentool.artifacts.store import (INVOCATION, ArtifactBuilder, WriteFailed, atomic_file, check_output,
                                     create_artifact, environment, file_entry, input_ref, read_artifact, replace_dir,
                                     sha256_file, verify_files, write_failure, write_manifest)

__all__ = ["INVOCATION", "KINDS", "MANIFEST", "MASKED_LM", "ArtifactBuilder", "Manifest", "Probe", "WriteFailed",
           "atomic_file", "canonical_json", "check_output", "content_id", "create_artifact", "environment",
           "file_entry", "fingerprint", "format_name", "input_ref", "kind_of", "parse_manifest", "probe",
           "read_artifact", "replace_dir", "sha256_file", "verify_files", "write_failure", "write_manifest"]
