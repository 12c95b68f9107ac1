"""Device check for a CUDA machine: results on the GPU equal the CPU's, and nothing leaves the device unasked.

Run on a machine with a GPU: ``python benchmarks/gpu_check.py``. It checks
1. every registered measure: value on CUDA equals the CPU value (1e-9), output on the input's device;
2. ``rp.compare`` of two digits CNNs on CUDA with every estimator equals the CPU map (1e-9), the models stay on
   the GPU and unmodified, fingerprints do not depend on the device, ``device="cpu"`` moves rows off the GPU;
3. capture of a padded batch through a tiny BERT on CUDA equals the CPU capture (1e-5);
4. ``rp.adversarial.shift`` runs on a CUDA model and returns a CUDA copy, leaving the original untouched.
Prints one line per check and exits 1 if any failed. (The tests run on CPU; this script is the GPU part.)
``python benchmarks/gpu_check.py --perf`` times W1 / W2 of the performance issue and a ViT-B/16 block map on the
GPU instead (prepared; not run yet: no GPU was lent to the session that wrote it).
``GPU_CHECK_DEVICE=cpu`` runs either on the CPU, and ``--perf --quick`` on small sizes: ``tests/test_benchmarks.py``
runs both that way, so the script's own bugs are found without a GPU.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings

import torch

warnings.simplefilter("ignore")
FAILURES: list[str] = []


def check(name: str):
    def wrap(fn):
        try:
            detail = fn()
            print(f"ok   {name}" + (f": {detail}" if detail else ""), flush=True)
        except Exception:
            FAILURES.append(name)
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
        return fn

    return wrap


def main() -> int:
    import repsim_plugin as rp
    from repsim_plugin.digits import load_digits_split, train_digits_cnn

    # GPU_CHECK_DEVICE=cpu runs the same script on the CPU (a dry run of the script itself)
    cuda = torch.device(os.environ.get("GPU_CHECK_DEVICE", "cuda"))
    if cuda.type == "cuda":
        assert torch.cuda.is_available(), "no CUDA device"
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}", flush=True)

    @check("every registered measure: CUDA value == CPU value, result on the input's device")
    def _measures():
        g = torch.Generator().manual_seed(0)
        X = torch.randn(64, 6, generator=g, dtype=torch.float64)
        Y = torch.tanh(X @ torch.randn(6, 5, generator=g, dtype=torch.float64)) + 0.3 * torch.randn(64, 5, generator=g)
        worst = 0.0
        for mid in rp.measures.list():
            m = rp.measures.make(mid)
            on_gpu = m(X.to(cuda), Y.to(cuda))
            assert on_gpu.device.type == cuda.type, f"{mid} returned on {on_gpu.device}"
            diff = abs(float(on_gpu) - float(m(X, Y)))
            assert diff < 1e-9, f"{mid}: |gpu - cpu| = {diff}"
            worst = max(worst, diff)
        return f"{len(rp.measures.list())} measures, max |gpu - cpu| = {worst:.1e}"

    a, _ = train_digits_cnn(seed=0)
    b, _ = train_digits_cnn(seed=1)
    _, _, Xte, yte = load_digits_split()
    data = list(zip(Xte.split(64), yte.split(64), strict=True))
    layers = ["relu1", "relu2", "fc1", "relu3", "fc2"]
    ga, gb = train_digits_cnn(seed=0)[0].to(cuda), train_digits_cnn(seed=1)[0].to(cuda)

    @check("compare on CUDA: statistics on the GPU == on the CPU (same rows); end to end close to CPU forwards")
    def _compare():
        fingerprint = rp.adapters.for_model(ga).fingerprint()
        same_rows = end_to_end = 0.0
        for measure, estimator in [
            ("cka", "feature_streaming"),
            ("debiased_cka", "feature_streaming"),
            ("cka", "sample_space"),
            ("debiased_cka", "minibatch"),
            ("rbf_cka", "captured"),
            ("procrustes", "captured"),
        ]:
            gpu = rp.compare(ga, gb, data, layers, layers, measure, estimator=estimator, progress=False)
            # the same GPU forward passes, rows moved to the CPU and accumulated there
            rows_on_cpu = rp.compare(
                ga, gb, data, layers, layers, measure, estimator=estimator, device="cpu", progress=False
            )
            cpu = rp.compare(a, b, data, layers, layers, measure, estimator=estimator, progress=False)
            d_same = float((gpu.values - rows_on_cpu.values).abs().max())
            d_end = float((gpu.values - cpu.values).abs().max())
            assert d_same < 1e-10, f"{measure}/{estimator}: GPU vs CPU statistics on the same rows differ by {d_same}"
            # float32 convolutions differ between the devices in the last bits, so the rows (not the statistics) do
            assert d_end < 1e-5, f"{measure}/{estimator}: GPU vs CPU forward passes differ by {d_end}"
            assert gpu.fingerprints == cpu.fingerprints, "fingerprints depend on the device"
            same_rows, end_to_end = max(same_rows, d_same), max(end_to_end, d_end)
        assert all(p.device.type == cuda.type for p in ga.parameters()), "the model was moved"
        assert rp.adapters.for_model(ga).fingerprint() == fingerprint, "the model was modified"
        return f"same rows: max diff {same_rows:.1e}; GPU vs CPU forward passes: max diff {end_to_end:.1e}"

    @check("capture keeps rows on the GPU by default and moves them with device='cpu'")
    def _devices():
        with rp.capture(ga, ["relu3"]) as rec:
            ga(Xte[:32].to(cuda))
        assert rec.activations["relu3"].device.type == cuda.type
        with rp.capture(ga, ["relu3"], device="cpu") as rec:
            ga(Xte[:32].to(cuda))
        assert rec.activations["relu3"].device.type == "cpu"

    @check("tiny BERT with padding: mean capture on CUDA == CPU")
    def _bert():
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
        )
        cpu_model = BertModel(config).eval()
        gpu_model = BertModel(config).eval()
        gpu_model.load_state_dict(cpu_model.state_dict())
        gpu_model.to(cuda)
        ids = torch.randint(1, 120, (6, 10), generator=torch.Generator().manual_seed(1))
        mask = torch.ones(6, 10, dtype=torch.long)
        mask[:3, 6:] = 0
        with rp.capture(cpu_model) as rc:
            cpu_model(input_ids=ids, attention_mask=mask)
        with rp.capture(gpu_model) as rg:
            gpu_model(input_ids=ids.to(cuda), attention_mask=mask.to(cuda))
        for name, rows in rc.activations.items():
            diff = float((rows - rg.activations[name].cpu()).abs().max())
            assert diff < 1e-5, f"{name}: {diff}"

    @check("adversarial.shift on a CUDA model returns a CUDA copy and leaves the original unchanged")
    def _shift():
        before = rp.adapters.for_model(ga).fingerprint()
        Xtr, ytr, _, _ = load_digits_split()
        result = rp.adversarial.shift(
            ga,
            "relu3",
            (Xtr, ytr),
            target=0.2,
            eval_data=(Xte, yte),
            steps=300,
            temperature=1.0,
            criterion="agreement",
            tolerance=0.02,
        )
        assert next(result.model.parameters()).device.type == cuda.type
        assert rp.adapters.for_model(ga).fingerprint() == before
        return f"CKA {result.measure_before:.3f} -> {result.measure_after:.3f}, agreement {result.agreement:.3f}"

    return 1 if FAILURES else 0


def _timed(fn, sync, rounds: int = 3) -> float:
    import statistics
    import time

    fn()
    sync()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def perf(quick: bool = False) -> int:
    """``--perf``: W1 and W2 of the performance issue on the GPU, and a ViT-B/16 12 x 12 block map over 4096 images
    against its forward passes (prepared for a GPU machine; prints one line per figure). ``quick``: the same steps
    on small sizes, to check the script itself (``GPU_CHECK_DEVICE=cpu``, run by ``tests/test_benchmarks.py``)."""
    import timm

    import repsim_plugin as rp

    dev = torch.device(os.environ.get("GPU_CHECK_DEVICE", "cuda"))
    if dev.type == "cuda":
        assert torch.cuda.is_available(), "no CUDA device"
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}", flush=True)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    n, p, q = (1000, 256, 128) if quick else (10000, 2048, 1024)
    X = torch.randn(n, p, generator=g).to(dev)
    Y = (X[:, :q] @ torch.randn(q, q, generator=g).to(dev) / q**0.5 + torch.randn(n, q, device=dev)).float()
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    bound = _timed(lambda: (Xc.T @ Yc, Xc.T @ Xc, Yc.T @ Yc), sync)
    for name in ("cka", "debiased_cka"):
        m, full = rp.measures.make(name), rp.measures.make(name, dtype=torch.float64)
        t = _timed(lambda m=m: m(X, Y), sync)
        err = abs(float(m(X, Y)) - float(full(X, Y)))
        print(
            f"W1 {name}: {t:.4f} s, {t / bound:.2f}x the float32 GEMM bound ({bound:.4f} s), |fast - float64| {err:.1e}"
        )
    layers = ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0", "layer4.1"]
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(timm.create_model("resnet18", pretrained=False, zero_init_last=False).eval().to(dev))
    batch, size, batches = (16, 32, 2) if quick else (128, 64, 8)
    data = [torch.randn(batch, 3, size, size, generator=g).to(dev) for _ in range(batches)]

    def forward(ms, batches):
        with torch.no_grad():
            for x in batches:
                for model in ms:
                    model(x)

    fwd = _timed(lambda: forward(models, data), sync)
    print(f"W2 forward passes: {fwd:.3f} s")
    for label, kw in {
        "default (exact)": {},
        "minibatch": {"measure": "debiased_cka", "estimator": "minibatch"},
        "spatial=mean": {"spatial": "mean"},
    }.items():
        t = _timed(lambda kw=kw: rp.compare(*models, data, layers, layers, progress=False, **kw), sync, rounds=2)
        print(f"W2 {label}: {t:.3f} s, overhead {t / fwd - 1:+.0%} over the forward passes")
    vits = [timm.create_model("vit_base_patch16_224", pretrained=False).eval().to(dev) for _ in range(2)]
    batch, batches = (2, 2) if quick else (256, 16)
    images = [torch.randn(batch, 3, 224, 224, generator=g).to(dev) for _ in range(batches)]
    blocks = [f"blocks.{i}" for i in range(12)]
    fwd = _timed(lambda: forward(vits, images), sync, rounds=1)
    t = _timed(lambda: rp.compare(*vits, images, blocks, blocks, progress=False), sync, rounds=1)
    n_images = batch * batches
    print(f"ViT-B/16 12 x 12 block map, {n_images} images: forward {fwd:.2f} s, compare {t:.2f} s ({t / fwd - 1:+.0%})")
    return 0


if __name__ == "__main__":
    if "--perf" in sys.argv:
        sys.exit(perf(quick="--quick" in sys.argv))
    code = main()
    print("FAILED: " + ", ".join(FAILURES) if FAILURES else "all device checks passed", flush=True)
    sys.exit(code)
