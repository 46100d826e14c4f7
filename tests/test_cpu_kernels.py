"""The native run-LoRA kernels (seal/cpu_kernels.py) against the torch route they replace
(`lora._RunLoRA`) and against the definition in float64."""

import copy

import pytest
import torch

from seal import cpu_kernels
from seal.lora import LoRASpec, MultiLoRA, _RunLoRA
from seal.training import AdapterJob, TrainHP, text_example, train_adapters

needs_kernels = pytest.mark.skipif(
    cpu_kernels.run_lora_library() is None,
    reason="native kernels need AVX512-BF16 and a C++ compiler",
)


def _case(k, d_in, d_out, r, runs, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g).bfloat16()
    a = torch.randn(k, d_in, r, generator=g) * 0.05
    b = torch.randn(k, r, d_out, generator=g) * 0.05
    y = torch.randn(n, d_out, generator=g).bfloat16()
    w = torch.randn(n, d_out, generator=g).bfloat16()
    return x, a, b, y, w


def _through(fn, x, a, b, y, w, runs, n, scaling):
    x, a, b = (t.clone().requires_grad_() for t in (x, a, b))
    y0 = y.clone().requires_grad_()
    out = fn(x, y0 * 1, a, b, scaling, runs, n)  # in place on a non-leaf, as the base output
    out.backward(w)
    return out.detach(), x.grad, a.grad, b.grad, y0.grad


def _reference(x, a, b, y, w, runs, scaling):
    """The definition in float64 from the same bf16 inputs (A and B rounded to bf16 first)."""
    x, y, w = x.double(), y.double(), w.double()
    a, b = a.bfloat16().double(), b.bfloat16().double()
    out, gx = y.clone(), torch.zeros_like(x)
    ga, gb = torch.zeros_like(a), torch.zeros_like(b)
    for s, e, k in runs:
        out[s:e] += scaling * x[s:e] @ a[k] @ b[k]
        gxa = scaling * w[s:e] @ b[k].T
        gx[s:e] = gxa @ a[k].T
        ga[k] += x[s:e].T @ gxa
        gb[k] += scaling * (x[s:e] @ a[k]).T @ w[s:e]
    return out, gx, ga, gb


CASES = {
    "runs of every slot": (
        8,
        64,
        96,
        16,
        [
            (0, 40, 0),
            (40, 73, 1),
            (73, 100, 2),
            (100, 145, 3),
            (145, 183, 4),
            (183, 212, 5),
            (212, 253, 6),
            (253, 289, 7),
        ],
        289,
    ),  # fmt: skip
    "a slot twice, gaps, unused slots": (
        4,
        48,
        32,
        16,
        [(3, 44, 1), (47, 77, 3), (80, 105, 1)],
        108,
    ),
    "odd and one-token runs": (3, 32, 80, 32, [(0, 1, 2), (1, 3, 0), (3, 6, 1), (6, 7, 0)], 9),
    "SmolLM2's widest layer": (2, 576, 1536, 32, [(0, 37, 0), (37, 80, 1)], 80),
}


@needs_kernels
@pytest.mark.parametrize("name", list(CASES))
def test_native_runs_equal_torch_runs_and_the_definition(name):
    """The forward output is bit for bit the torch route's (the same bf16 products and
    rounding); the input gradient nearly so; the weight gradients are accumulated and returned
    in fp32 (torch's route rounds them to bf16 on the way), so they are at least as close to
    the float64 definition. Slots without a run get zero gradients, rows outside the runs a
    zero input gradient and their output untouched."""
    k, d_in, d_out, r, runs, n = CASES[name]
    x, a, b, y, w = _case(k, d_in, d_out, r, runs, n)
    native = _through(cpu_kernels.NativeRunLoRA.apply, x, a, b, y, w, runs, n, 2.0)

    def torch_runs(x, y, a, b, scaling, runs, n):
        return _RunLoRA.apply(x, y, a.bfloat16(), b.bfloat16(), scaling, runs, n)

    ours = _through(torch_runs, x, a, b, y, w, runs, n, 2.0)
    want = _reference(x, a, b, y, w, runs, 2.0)
    assert torch.equal(native[0], ours[0])
    assert torch.equal(native[4], w)  # the base output's gradient passes through
    for got, theirs, exact in zip(native[1:4], ours[1:4], want[1:4], strict=True):
        scale = exact.abs().max().item() or 1.0
        err = (got.double() - exact).abs().max().item() / scale
        err_torch = (theirs.double() - exact).abs().max().item() / scale
        assert err <= max(2 * err_torch, 1e-2), (err, err_torch)
    used = {k for _, _, k in runs}
    covered = torch.zeros(n, dtype=torch.bool)
    for s, e, _ in runs:
        covered[s:e] = True
    assert torch.equal(native[0][~covered], y[~covered])
    assert not native[1][~covered].any()
    for slot in set(range(k)) - used:
        assert not native[2][slot].any() and not native[3][slot].any()


TEXTS = [
    ["Alpha beta gamma delta.", "The Varrow lighthouse was built in 1843.", "A third line."],
    ["Some other text about a river called Pell.", "x y z"],
    ["Third job, one line only"],
]


def _train_bf16(tiny, native, monkeypatch, slots_at_once):
    model = copy.deepcopy(tiny.model).to(torch.bfloat16)
    tok, spec = tiny.tokenizer, LoRASpec(r=16, alpha=32)
    hp = TrainHP(lr=5e-3, epochs=2, batch_size=1)
    calls = {"native": 0}
    apply = cpu_kernels.NativeRunLoRA.apply

    def counted(*args):
        calls["native"] += 1
        return apply(*args)

    losses, states = [], []
    with monkeypatch.context() as m:
        m.setattr(cpu_kernels.NativeRunLoRA, "apply", counted)
        if not native:
            m.setattr(cpu_kernels, "usable", lambda *_: False)
        for group in slots_at_once:
            lora = MultiLoRA(model, len(TEXTS), spec)
            jobs = []
            for slot in group:
                lora.reset(slot, 100 + slot)
                examples = [text_example(tok, t, 64) for t in TEXTS[slot]]
                jobs.append(AdapterJob(slot, examples, 100 + slot, hp))
            stats = train_adapters(model, lora, jobs, tok.pad_token_id, pack=True)
            losses += [s.losses for s in stats]
            states += [lora.state(s) for s in group]
            lora.remove()
    return losses, states, calls["native"]


@needs_kernels
def test_native_training_equals_torch_training_and_each_adapter_alone(tiny, monkeypatch):
    """bf16 training of three adapters in one pass through the native kernels: the losses and
    weights of the torch route (to bf16 rounding), and of each adapter trained alone (one
    adapter's rows are one block: `_BlockLoRA`)."""
    together = _train_bf16(tiny, True, monkeypatch, [[0, 1, 2]])
    through_torch = _train_bf16(tiny, False, monkeypatch, [[0, 1, 2]])
    alone = _train_bf16(tiny, True, monkeypatch, [[0], [1], [2]])
    assert together[2] > 0 and through_torch[2] == 0
    for other in (through_torch, alone):
        torch.testing.assert_close(together[0], other[0], rtol=2e-2, atol=2e-2)
        for a, b in zip(together[1], other[1], strict=True):
            for key in a:
                torch.testing.assert_close(a[key], b[key], rtol=5e-2, atol=5e-3)


def test_native_kernels_only_where_they_apply(monkeypatch):
    """fp32 activations, bf16 masters or an odd dimension take torch's route;
    SEAL_NATIVE=0 turns the kernels off."""
    x = torch.zeros(4, 64, dtype=torch.bfloat16)
    a, b = torch.zeros(2, 64, 16), torch.zeros(2, 16, 32)
    monkeypatch.setattr(cpu_kernels, "run_lora_library", lambda: object())
    assert cpu_kernels.usable(x, a, b)
    assert not cpu_kernels.usable(x.float(), a, b)
    assert not cpu_kernels.usable(x, torch.zeros(2, 64, 12), torch.zeros(2, 12, 32))
    assert not cpu_kernels.usable(x, a.bfloat16(), b)
    monkeypatch.undo()
    monkeypatch.setenv("SEAL_NATIVE", "0")
    cpu_kernels.run_lora_library.cache_clear()
    try:
        assert cpu_kernels.run_lora_library() is None
    finally:
        monkeypatch.undo()
        cpu_kernels.run_lora_library.cache_clear()


def test_a_failed_build_names_the_compiler_and_the_source(tmp_path, monkeypatch):
    """A compiler error comes back as a RuntimeError with the compiler's message, and no file
    is left in the cache; the next call tries again."""
    bad = tmp_path / "broken.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setenv("CXX", "g++")
    if cpu_kernels._compiler() is None or not __import__("shutil").which("g++"):
        pytest.skip("no g++ here")
    with pytest.raises(RuntimeError, match="broken.cpp"):
        cpu_kernels.build(bad, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises((RuntimeError, OSError)):
        cpu_kernels.build(bad, tmp_path / "out2")


def test_the_build_is_cached_by_source(tmp_path, monkeypatch):
    """The same source builds once; an edited source builds a new library."""
    import shutil

    if shutil.which("g++") is None:
        pytest.skip("no g++ here")
    monkeypatch.setenv("CXX", "g++")
    src = tmp_path / "k.cpp"
    src.write_text('extern "C" int seven() { return 7; }\n')
    monkeypatch.setattr(cpu_kernels, "FLAGS", ("-O1", "-shared", "-fPIC"))
    first = cpu_kernels.build(src, tmp_path / "out")
    mtime = first.stat().st_mtime_ns
    assert cpu_kernels.build(src, tmp_path / "out") == first
    assert first.stat().st_mtime_ns == mtime
    src.write_text('extern "C" int seven() { return 8 - 1; }\n')
    second = cpu_kernels.build(src, tmp_path / "out")
    assert second != first and second.exists()
    import ctypes

    assert ctypes.CDLL(str(second)).seven() == 7
