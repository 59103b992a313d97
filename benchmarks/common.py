"""Shared pieces of the benchmarks: a random-weight GPT-NeoX, random TopK SAEs, tokens, memory.

Nothing here is downloaded: the model is a GPT-NeoX config with random weights
saved with `save_pretrained` to a temporary directory and loaded through
`sae_acceptance.sources.model.load_model`, the same path a local checkpoint
takes in the product.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SPECIAL_IDS = (0, 1, 2)  # bos, eos, pad of the benchmark's vocabulary: excluded from every metric


@dataclass(frozen=True)
class ModelSize:
    d_model: int
    n_layers: int
    n_heads: int
    vocab: int


PRESETS = {
    "tiny": ModelSize(d_model=256, n_layers=6, n_heads=8, vocab=4096),
    "pythia-70m": ModelSize(d_model=512, n_layers=6, n_heads=8, vocab=50304),
    "pythia-410m": ModelSize(d_model=1024, n_layers=24, n_heads=16, vocab=50304),
}


def add_model_args(parser) -> None:
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="tiny",
        help="model size (random weights); the flags below override its fields",
    )
    parser.add_argument("--d-model", type=int)
    parser.add_argument("--n-layers", type=int)
    parser.add_argument("--n-heads", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads; 0: torch's default. Default 1: on a shared machine "
        "several threads per process make timings erratic (15x swings seen here)",
    )
    parser.add_argument("--seed", type=int, default=0)


def set_threads(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def model_size(args) -> ModelSize:
    base = PRESETS[args.preset]
    return ModelSize(
        d_model=args.d_model or base.d_model,
        n_layers=args.n_layers or base.n_layers,
        n_heads=args.n_heads or base.n_heads,
        vocab=args.vocab or base.vocab,
    )


def build_checkpoint(out: Path, size: ModelSize, ctx: int, seed: int = 0) -> Path:
    """A Pythia-like GPT-NeoX (parallel residual, rotary on 1/4 of each head) with random weights."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=size.vocab,
        hidden_size=size.d_model,
        num_hidden_layers=size.n_layers,
        num_attention_heads=size.n_heads,
        intermediate_size=4 * size.d_model,
        max_position_embeddings=max(2048, ctx),
        rotary_pct=0.25,
        use_parallel_residual=True,
        initializer_range=0.1,  # less flat next-token distributions than 0.02: CE/KL move when patched
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    GPTNeoXForCausalLM(config).eval().save_pretrained(out, safe_serialization=True)
    return out


def load_bench_model(path: Path, device: str, dtype: str):
    from sae_acceptance.sources.model import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(path, device=device, dtype=dtype)


# *-full: the backend forced to full passes; tl4: TransformerLens 4's bridge (an error without it)
BACKENDS = ("transformer_lens", "tl4", "tl4-full", "hf", "hf-full")


def add_backend_arg(parser) -> None:
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="transformer_lens",
        help="how the project runs the model: TransformerLens (3 or 4, whichever is installed), "
        "TransformerLens 4's bridge with tails (tl4) or full passes (tl4-full), "
        "Hugging Face with tails (hf) or full passes (hf-full)",
    )


def load_bench_backend(path: Path, device: str, dtype: str, backend: str):
    """The project's backend for the benchmark checkpoint (*-full: full passes forced)."""
    from sae_acceptance.sources.model import load_backend, transformer_lens_major

    if backend.startswith("tl4") and transformer_lens_major() < 4:
        sys.exit(f"--backend {backend}: TransformerLens 4 is not installed in this environment")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_backend(
            path, device=device, dtype=dtype, backend="hf" if backend.startswith("hf") else "transformer_lens"
        )
    if backend == "hf-full":
        from sae_acceptance.sources.backends.hf import HFBackend

        return HFBackend.wrap(loaded.model, loaded.tokenizer, full_passes=True)
    if backend == "tl4-full":
        from sae_acceptance.sources.backends.bridge import BridgeBackend

        return BridgeBackend.wrap(loaded.model, loaded.tokenizer, full_passes=True)
    return loaded


def bare_topk(flat: torch.Tensor, w_enc, b_enc, w_dec, b_dec, k: int) -> torch.Tensor:
    """A TopK encode/decode with nothing around it: the limit's SAE work."""
    values, indices = ((flat - b_dec) @ w_enc + b_enc).topk(k, dim=-1, sorted=False)
    return torch.nn.functional.embedding_bag(indices, w_dec, per_sample_weights=values.relu(), mode="sum") + b_dec


class BareTails:
    """The limit's forward work, bare: one original forward capturing the hooks' activations and the
    residuals tails start from, then tails from a block on, a hook inside it replaced where asked
    (TransformerLens `start_at_layer`; Hugging Face, and TransformerLens 4's bridge through its
    Hugging Face model: the decoder layers from there with the arguments the original forward
    gave them, the final norm, the head)."""

    def __init__(self, backend) -> None:
        bridge = backend.kind == "transformer_lens_4"
        self.model = backend.model.original_model if bridge else backend.model
        self.hf = backend.kind == "hf" or bridge
        if self.hf:
            from sae_acceptance.sources.backends.families import family_of

            self.family = family_of(self.model.config.architectures[0])
            self.layers = self.model.get_submodule(self.family.layers)
            self.norm = self.model.get_submodule(self.family.final_norm)
            self.head = self.model.get_output_embeddings()
        self.n_layers = backend.n_layers

    def _module(self, hook: str):
        _, layer, kind = hook.split(".", 2)
        return self.model.get_submodule(self.family.module_path(int(layer), kind))

    def original(self, tokens: torch.Tensor, entries: set[int], hooks: list[str]):
        """(logits, {L: residual entering block L}, {hook: activation}) of one full forward."""
        at_entry: dict[int, torch.Tensor] = {}
        acts: dict[str, torch.Tensor] = {}
        if not self.hf:

            def entry_name(e):
                return f"blocks.{e}.hook_resid_pre" if e < self.n_layers else f"blocks.{e - 1}.hook_resid_post"

            def store(into, key):
                def fn(act, hook):
                    into[key] = act

                return fn

            fwd = [(entry_name(e), store(at_entry, e)) for e in entries] + [(h, store(acts, h)) for h in hooks]
            with self.model.hooks(fwd_hooks=fwd):
                return self.model(tokens), at_entry, acts
        self.calls: dict[int, tuple] = {}
        handles = []
        for i in range(min(entries), self.n_layers):

            def pre(module, args, kwargs, i=i):
                at_entry[i] = args[0]
                self.calls[i] = (args[1:], kwargs)

            handles.append(self.layers[i].register_forward_pre_hook(pre, with_kwargs=True))
        for h in hooks:

            def post(module, args, output, h=h):
                acts[h] = output[0] if isinstance(output, tuple) else output

            handles.append(self._module(h).register_forward_hook(post))
        logits = self.model(input_ids=tokens, use_cache=False).logits
        for handle in handles:
            handle.remove()
        return logits, at_entry, acts

    def tail(self, x: torch.Tensor, layer: int, replace: tuple[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits from residual `x` entering block `layer`, hook `replace[0]` set to `replace[1]`."""
        if not self.hf:
            fwd = [] if replace is None else [(replace[0], lambda act, hook: replace[1].reshape(act.shape))]
            with self.model.hooks(fwd_hooks=fwd):
                return self.model(x, start_at_layer=layer)
        handle = None if replace is None else self._module(replace[0]).register_forward_hook(lambda m, a, o: replace[1])
        for i in range(layer, self.n_layers):
            args, kwargs = self.calls[i]
            x = self.layers[i](x, *args, **kwargs)
            x = x[0] if isinstance(x, tuple) else x
        logits = self.head(self.norm(x))
        if handle is not None:
            handle.remove()
        return logits


def random_topk_sae(d_in: int, d_sae: int, k: int, seed: int, hook: str, b_dec=None):
    """A TopK SAE with a unit-norm random decoder and the encoder as its transpose."""
    from sae_acceptance.sources.sae import SAE

    g = torch.Generator().manual_seed(seed)
    w_dec = torch.nn.functional.normalize(torch.randn(d_sae, d_in, generator=g), dim=1)
    b_dec = torch.zeros(d_in) if b_dec is None else b_dec.float().cpu()
    return SAE(
        w_dec.T.contiguous(),
        torch.randn(d_sae, generator=g) * 0.01,
        w_dec,
        b_dec,
        architecture="topk",
        k=k,
        hook_name=hook,
        model_name="bench-random",
    )


def random_tokens(n_seq: int, ctx: int, vocab: int, seed: int) -> torch.Tensor:
    """Uniform token ids with a bos (0) at position 0; ids 0, 1, 2 are special and excluded."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(len(SPECIAL_IDS), vocab, (n_seq, ctx), generator=g)
    tokens[:, 0] = SPECIAL_IDS[0]
    return tokens


def counted_mask(tokens: torch.Tensor) -> torch.Tensor:
    return ~torch.isin(tokens, torch.tensor(SPECIAL_IDS))


# ----------------------------------------------------------------------------- timing, memory


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Timer:
    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self.start
        # CPU seconds of every thread of the process: less sensitive than wall time to other
        # processes sharing the cores (they take turns, they do not add work)
        self.cpu_seconds = time.process_time() - self.cpu_start


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of the code inside the block.

    CUDA: torch.cuda.max_memory_allocated after a reset (bytes torch allocated).
    CPU: the resident set's high-water mark (VmHWM, reset through /proc/self/clear_refs
    on Linux, so that loading the model does not count), and as a fallback the
    process's ru_maxrss. tracemalloc does not see torch's allocations.
    """

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        self.rss_before_mb = (_status_kb("VmRSS") or 0) / 1024
        self.hwm_reset = False
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            self.cuda_before_mb = torch.cuda.memory_allocated() / 2**20
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.hwm_reset = True
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        self.maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        hwm = _status_kb("VmHWM")
        self.peak_rss_mb = hwm / 1024 if (hwm is not None and self.hwm_reset) else self.maxrss_mb
        if self.device.startswith("cuda"):
            self.cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.cuda_peak_mb = None

    def as_dict(self) -> dict:
        out = {
            "rss_before_mb": round(self.rss_before_mb, 1),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "peak_rss_over_before_mb": round(self.peak_rss_mb - self.rss_before_mb, 1),
            "process_maxrss_mb": round(self.maxrss_mb, 1),
        }
        if self.cuda_peak_mb is not None:
            out["cuda_peak_mb"] = round(self.cuda_peak_mb, 1)
            out["cuda_peak_over_before_mb"] = round(self.cuda_peak_mb - self.cuda_before_mb, 1)
        return out


def peak_mb(memory: dict) -> float:
    """The number the tables show: CUDA peak when on a GPU, else the block's peak RSS."""
    return memory.get("cuda_peak_mb", memory["peak_rss_mb"])


def peak_over_start_mb(memory: dict) -> float:
    """How far the block's peak rose above the memory in use when it started."""
    return memory.get("cuda_peak_over_before_mb", memory["peak_rss_over_before_mb"])


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ----------------------------------------------------------------------------- subprocess workers


def run_worker(script: Path, argv: list[str], label: str, inline=None) -> dict:
    """Run `script --worker ...` in a fresh interpreter; its last `RESULT {json}` line is the answer.

    `inline(argv) -> dict` runs it in this process instead (`--inline`: a smoke test of the
    commands, whose timings and peak memory mean nothing)."""
    if inline is not None:
        print(f"  [{label}] {' '.join(argv[:2])} (inline) ...", flush=True)
        return json.loads(json.dumps(inline(argv)))
    cmd = [sys.executable, str(script), *argv]
    print(f"  [{label}] {' '.join(argv[:2])} ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
    raise RuntimeError(f"worker {label} failed (exit {proc.returncode})")


def add_inline_arg(parser) -> None:
    parser.add_argument(
        "--inline",
        action="store_true",
        help="run every contender in this process: a quick check that the commands work (timings meaningless)",
    )


def worker_flags(argv: list[str]) -> list[str]:
    """The parent's command-line flags minus those a worker gets its own value for."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--json", "--workdir"):
            skip = True
            continue
        if a.startswith(("--json=", "--workdir=")):
            continue
        out.append(a)
    return out


def emit(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def environment(device: str) -> dict:
    import importlib.metadata as md

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "device": device,
        "packages": {p: version(p) for p in ("sae-acceptance", "transformer-lens", "sae-lens", "eai-sparsify")},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    env["code"] = code_fingerprint()
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def code_fingerprint() -> dict:
    """What the timings belong to: the git commit, and a hash of the files benchmarked (uncommitted edits count)."""
    import hashlib

    import sae_acceptance

    root = Path(sae_acceptance.__file__).resolve().parent
    out = {}
    for rel in ("engine.py", "train/topk.py", "train/activations.py", "sources/sae.py"):
        path = root / rel
        if path.exists():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    try:
        out["git_commit"] = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        out["git_dirty"] = bool(
            subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--", str(root)],
                capture_output=True,
                text=True,
            ).stdout.strip()
        )
    except OSError:
        pass
    try:
        from sae_acceptance.train.topk import TRAINER_VERSION

        out["trainer_version"] = TRAINER_VERSION
    except ImportError:
        pass
    return out


def as_jsonable(obj):
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    return obj


def uptime() -> str:
    """`uptime`'s line (1-, 5- and 15-minute load averages): how shared the machine was."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def load_average() -> float | None:
    """1-minute load average at the end of a run: a shared machine's timings are only as good as this."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None
