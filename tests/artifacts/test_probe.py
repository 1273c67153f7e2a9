import json

from hypothesis import given, settings
from hypothesis import strategies as st

from gentool.artifacts import MASKED_LM, create_artifact, probe


def _artifact(path, kind, **contents):
    with create_artifact(path, kind) as art:
        art.contents.update(contents)
    return path


def test_kinds_and_families(tmp_path):
    assert probe(_artifact(tmp_path / "a", "lm-checkpoint")) == ("lm-checkpoint", None)
    mdlm = probe(_artifact(tmp_path / "m", "diffusion-checkpoint", family=MASKED_LM))
    assert mdlm == ("diffusion-checkpoint", "masked-lm") and not mdlm.is_denoiser
    ddpm = probe(_artifact(tmp_path / "d", "diffusion-checkpoint", family="ddpm"))
    assert ddpm.family == "ddpm" and ddpm.is_denoiser
    assert probe(tmp_path / "missing") == (None, None)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert probe(tmp_path / "hf") == (None, None)  # a Hugging Face directory: no gentool manifest


@settings(max_examples=50, deadline=None)
@given(st.one_of(st.binary(max_size=64).map(lambda b: b), st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8
).map(lambda v: json.dumps(v).encode())))
def test_never_raises_on_garbage(tmp_path_factory, blob):
    d = tmp_path_factory.mktemp("g")
    (d / "manifest.json").write_bytes(blob)
    kind, family = probe(d)
    assert kind is None or isinstance(kind, str)
    assert family is None or isinstance(family, str)
