"""Time and peak memory of logprob + entropy (forward + backward), chunked vs naive.

    python scripts/bench_logprobs.py                      # 2 x 512 tokens, V = 49152, chunk 256 (CPU)
    python scripts/bench_logprobs.py --large              # 8 x 4096 tokens, V = 49152
    python scripts/bench_logprobs.py --device cuda --dtype bfloat16 --chunk-size 2048

Naive = full [N, V] logits, then `logprobs_from_logits` + `entropy_from_logits`; chunked =
`trainer.logprobs.logprobs_and_entropy_from_hidden`. Each variant runs in a fresh subprocess so
that peak memory is its own: CUDA max_memory_allocated, or on CPU the growth of the process's
max RSS over its baseline after the inputs exist.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _peak_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _worker(args: argparse.Namespace) -> dict:
    import torch

    from trainer.logprobs import entropy_from_logits, logprobs_and_entropy_from_hidden, logprobs_from_logits

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    n = args.batch * args.seq
    hidden = (torch.randn(n, args.hidden, device=device) * 0.5).to(dtype).requires_grad_(True)
    weight = (torch.randn(args.vocab, args.hidden, device=device) * 0.02).to(dtype).requires_grad_(True)
    labels = torch.randint(0, args.vocab, (n,), device=device)

    def run() -> None:
        if args.variant == "naive":
            logits = hidden @ weight.t()
            logprobs, entropy = logprobs_from_logits(logits, labels), entropy_from_logits(logits)
        else:
            logprobs, entropy = logprobs_and_entropy_from_hidden(
                hidden, weight, labels, with_entropy=True, chunk_size=args.chunk_size
            )
        (logprobs.sum() + 1e-3 * entropy.sum()).backward()
        hidden.grad = weight.grad = None

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    baseline = 0.0
    if device.type == "cuda":
        run()  # warm-up (kernels, allocator)
        sync()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device) / 2**20
    else:
        baseline = _peak_mib(device)  # inputs exist; the first run sets the peak
    start = time.perf_counter()
    for _ in range(args.repeats):
        run()
    sync()
    seconds = (time.perf_counter() - start) / args.repeats
    return {"variant": args.variant, "seconds": seconds, "peak_mib": _peak_mib(device) - baseline}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)  # SmolLM2-135M
    parser.add_argument("--large", action="store_true", help="8 x 4096 tokens")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--variants", default="naive,chunked")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = parser.parse_args()
    if args.large:
        args.batch, args.seq = 8, 4096
    if args.variant:
        print(json.dumps(_worker(args)))
        return

    print(
        f"N = {args.batch} x {args.seq} tokens, V = {args.vocab}, H = {args.hidden}, "
        f"{args.dtype} on {args.device}, chunk {args.chunk_size}, fwd+bwd"
    )
    passthrough = [a for a in sys.argv[1:] if a != "--large"]
    passthrough += ["--batch", str(args.batch), "--seq", str(args.seq)]
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, *passthrough, "--variant", variant]
        # glibc keeps freed large blocks in its heap; a fixed mmap threshold returns them, so
        # max RSS tracks live tensors on CPU (no effect on CUDA numbers)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            print(f"  {variant:8s} failed: {tail}")
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  {variant:8s} {result['seconds'] * 1e3:9.1f} ms/iter   peak +{result['peak_mib']:9.1f} MiB")


if __name__ == "__main__":
    main()
