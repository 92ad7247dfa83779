"""Build real BitNet ONNX graphs from Hugging Face transformers' ``BitNetForCausalLM`` (export-time only).

This is the one code path behind ``models/make_models.py`` (the bundled example models) and
``bench/make_bench_model.py`` (the large benchmark exports). It needs the ``export`` extra
(torch==2.13.0 CPU, transformers, onnxscript) and is never imported by the ``bitnet_coreml`` package.

Recipe (see models/README.md, "How the graphs are made"):

1. ``BitNetForCausalLM(BitNetConfig(...))`` with a fixed seed, random init; the RMSNorm gammas are
   randomised around 1 so a converter that drops a gamma is caught by the parity oracle.
2. Every ``nn.Linear`` except ``lm_head`` is replaced with transformers' own BitNet layer:

   - ``offline``: ``AutoBitLinear(online_quant=False)``; ``weight = clip(round(W*s), -1, 1)`` (a float
     tensor of {-1, 0, 1}), ``weight_scale = 1/s``; the graph multiplies the matmul output by it.
   - ``online``: ``AutoBitLinear(online_quant=True)``; ``weight = W`` (float); the graph carries the
     WeightQuant subgraph (Abs, ReduceMean, Clip, Reciprocal, Mul, Round, Clip, Div).
   - ``packed``: ``BitLinear``; ``weight = pack_weights(ternary)`` (uint8 ``[out/4, in]``),
     ``weight_scale = s``; the graph unpacks in-graph and divides the output by the scales.

   with ``s = 1 / mean(|W|)`` (absmean, per tensor, as transformers' WeightQuant computes it).
3. A wrapper whose ``forward(input_ids)`` returns ``model(input_ids=..., use_cache=False).logits``
   (returning the model output itself fails on ``DynamicCache``), exported with
   ``torch.onnx.export(..., dynamo=True, optimize=False)`` and then optimised with onnxscript's
   optimizer (the same one the exporter runs) with its constant-folding input limit lowered to one
   element below the model's smallest BitNet weight. The exporter's default limit (8192 elements)
   folds the WeightQuant / unpack subgraphs of the *small* weights only, which would leave a mixed
   graph; the lowered limit keeps every ternary weight in the form that the model's ``form`` names.

``BitLinear``'s helpers (``unpack_weights``, ``activation_quant``, ``post_quant_process``) are wrapped
in ``torch.compile`` and do not export: :func:`eager_bitlinear_helpers` swaps in eager equivalents
for the duration of an export. The unpack casts the packed uint8 to int32 before masking and
shifting (otherwise the exporter emits a BitwiseAnd with mixed int8/uint8 inputs that ONNX Runtime
rejects).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("bitnet_export")

FORMS = ("offline", "online", "packed")
# How export_onnx makes the graph: "default" = the exporter's defaults (dynamo, optimize=True), what
# a user gets; "form" = unoptimised export + the same optimizer with a lowered folding limit, which
# keeps every linear in the weight form the model is meant to show (see export_onnx).
RECIPES = ("default", "form")
# onnxscript's default constant-folding input limit (elements); export_onnx lowers it below the
# smallest BitNet weight of the model so no WeightQuant / unpack subgraph is folded away.
DEFAULT_FOLD_INPUT_LIMIT = 8192


@dataclass(frozen=True)
class ModelSpec:
    """One export: BitNet config, weight form, fixed input shape and how to save it."""

    name: str
    form: str  # offline | online | packed
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    seq: int = 16
    batch: int = 1
    seed: int = 0
    external_data: bool = False
    output_name: str | None = "logits"  # None: keep the exporter's own name
    recipe: str = "default"  # RECIPES: the exporter's defaults, or the form-preserving recipe
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"ModelSpec {self.name}: form {self.form!r} not in {FORMS}")
        if self.recipe not in RECIPES:
            raise ValueError(f"ModelSpec {self.name}: recipe {self.recipe!r} not in {RECIPES}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"ModelSpec {self.name}: hidden/heads/kv_heads must divide evenly")
        head_dim = self.hidden // self.heads
        if self.form == "packed" and any(n % 4 for n in (self.hidden, self.intermediate, self.kv_heads * head_dim)):
            raise ValueError(f"ModelSpec {self.name}: packed needs every out_features divisible by 4")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bitnet_config(spec: ModelSpec, **extra: Any) -> Any:
    from transformers import BitNetConfig

    return BitNetConfig(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=max(64, spec.seq),
        rms_norm_eps=spec.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        # The default BOS/EOS ids (128000/128001) lie outside a small vocabulary; transformers warns.
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
        **extra,
    )


def ternarise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """absmean ternarisation as transformers' WeightQuant: returns (codes in {-1,0,1} float32, s)."""
    w = w.detach().float()
    s = 1.0 / w.abs().mean().clamp(min=1e-5)
    return (w * s).round().clamp(-1, 1), s


def random_float_model(spec: ModelSpec, **config_extra: Any) -> Any:
    """A randomly initialised float BitNetForCausalLM (deterministic for spec.seed)."""
    from transformers import BitNetForCausalLM

    torch.manual_seed(spec.seed)
    model = BitNetForCausalLM(bitnet_config(spec, **config_extra)).eval()
    gen = torch.Generator().manual_seed(spec.seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
    return model


def ternarise_model(model: Any, form: str) -> Any:
    """Replace every nn.Linear except lm_head with transformers' BitNet layer of the given form."""
    from transformers.integrations.bitnet import AutoBitLinear, BitLinear, pack_weights

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    for name, lin in linears:
        if isinstance(lin, AutoBitLinear):
            continue
        codes, s = ternarise(lin.weight)
        dtype = lin.weight.dtype
        new: torch.nn.Module
        if form == "offline":
            new = AutoBitLinear(lin.in_features, lin.out_features, bias=False, dtype=dtype, online_quant=False)
            with torch.no_grad():
                new.weight.copy_(codes.to(dtype))
                new.weight_scale.copy_((1.0 / s).reshape(1).to(dtype))
        elif form == "online":
            new = AutoBitLinear(lin.in_features, lin.out_features, bias=False, dtype=dtype, online_quant=True)
            with torch.no_grad():
                new.weight.copy_(lin.weight)
        elif form == "packed":
            new = BitLinear(lin.in_features, lin.out_features, bias=False, dtype=dtype)
            with torch.no_grad():
                # pack_weights adds 1 in place: give it its own int8 copy.
                new.weight.copy_(pack_weights(codes.to(torch.int8).clone()))
                new.weight_scale.copy_(s.reshape(1).to(dtype))
        else:
            raise ValueError(f"unknown form {form!r}; supported: {FORMS}")
        new.requires_grad_(False)
        model.set_submodule(name, new)
    if not linears:
        raise RuntimeError("no nn.Linear found to ternarise")
    return model


def build_model(spec: ModelSpec) -> Any:
    return ternarise_model(random_float_model(spec), spec.form)


def make_input_ids(spec: ModelSpec) -> np.ndarray:
    rng = np.random.default_rng(spec.seed + 1000)
    return rng.integers(0, spec.vocab, size=(spec.batch, spec.seq), dtype=np.int64)



# --- trained fixtures: a synthetic Markov corpus and a short quantisation-aware training ------------
#
# Random-init logits are near-flat: the argmax is decided by differences far below fp16 noise, so an
# argmax-agreement criterion measures nothing on them. The bundled models are instead trained for a
# few hundred steps (ternary weights in the loop) on a seeded synthetic corpus whose next token is
# nearly determined, which gives them confident, peaked predictions as a real model has.

# successor probabilities of a state with 1, 2 or 3 likely successors (clearly ordered: no ties)
_SUCCESSOR_PROBS = {1: (1.0,), 2: (0.7, 0.3), 3: (0.6, 0.25, 0.15)}


@dataclass(frozen=True)
class TrainSpec:
    """Markov corpus and training schedule for one bundled model (everything seeded by ``seed``)."""

    states: int = 256  # token ids used (spread over the whole vocabulary); min(states, vocab)
    restart: float = 0.05  # probability of jumping to a uniformly random state instead
    steps: int = 400
    batch: int = 32
    lr: float = 3e-3
    eval_batches: int = 8  # eval_input_ids [eval_batches, batch, seq] drawn from the same chain
    gamma_log_std: float = 0.5  # RMSNorm gammas exp(N(0, s^2)): wide enough that dropping any one shows
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MarkovChain:
    """``tokens[i]``: the token id of state i; ``succ[i, j]`` / ``probs[i, j]``: its successors (padded with p 0)."""

    tokens: np.ndarray  # int64 [n]
    succ: np.ndarray  # int64 [n, 3], state indices
    probs: np.ndarray  # float64 [n, 3], rows sum to 1 - restart
    restart: float

    def sample(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """Token ids of shape ``shape`` (last axis: time), each row one walk from a uniform start state."""
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        n = len(self.tokens)
        cum = np.cumsum(self.probs, axis=1)
        state = rng.integers(0, n, size=rows)
        out = np.empty((rows, shape[-1]), dtype=np.int64)
        for t in range(shape[-1]):
            out[:, t] = state
            u = rng.random(rows)
            pick = (u[:, None] >= cum[state]).sum(axis=1)  # 0..2 a successor, 3: restart
            jump = rng.integers(0, n, size=rows)
            nxt = self.succ[state, np.minimum(pick, 2)]
            state = np.where(pick >= self.probs.shape[1], jump, nxt)
        return self.tokens[out].reshape(shape)


def markov_chain(vocab: int, train: TrainSpec) -> MarkovChain:
    """A sparse, peaked first-order chain over ``min(states, vocab)`` ids spread over ``[0, vocab)``.

    One id is drawn from each of ``n`` equal bins of the vocabulary, so the highest bins (e.g. ids
    above a converter's split point) always occur. Each state has 1, 2 or 3 successors with the
    fixed probabilities of ``_SUCCESSOR_PROBS`` (times ``1 - restart``).
    """
    rng = np.random.default_rng(train.seed + 2000)
    n = min(train.states, vocab)
    edges = np.linspace(0, vocab, n + 1).astype(np.int64)
    tokens = np.array([rng.integers(lo, hi) for lo, hi in zip(edges[:-1], edges[1:], strict=True)], dtype=np.int64)
    succ = np.zeros((n, 3), dtype=np.int64)
    probs = np.zeros((n, 3), dtype=np.float64)
    for i in range(n):
        k = int(rng.integers(1, 4))
        succ[i, :k] = rng.choice(n, size=k, replace=False)
        probs[i, :k] = np.asarray(_SUCCESSOR_PROBS[k]) * (1.0 - train.restart)
    return MarkovChain(tokens=tokens, succ=succ, probs=probs, restart=train.restart)


def _weight_quant_eager(ctx: Any, weight: torch.Tensor) -> torch.Tensor:
    """transformers' WeightQuant.forward without torch.compile (same arithmetic)."""
    dtype = weight.dtype
    weight = weight.float()
    scale = 1.0 / weight.abs().mean().clamp(min=1e-5)
    return ((weight * scale).round().clamp(-1, 1) / scale).to(dtype)


def _act_quant_eager(ctx: Any, activation: torch.Tensor) -> torch.Tensor:
    """transformers' ActQuant.forward without torch.compile (same arithmetic)."""
    dtype = activation.dtype
    activation = activation.float()
    scale = 127 / activation.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
    return ((activation * scale).round().clamp(-128, 127) / scale).to(dtype)


@contextlib.contextmanager
def eager_quant_autograd(threads: int = 1) -> Iterator[None]:
    """Swap WeightQuant / ActQuant's torch.compile'd forwards for eager ones; pin torch's thread count.

    The backward passes (straight-through: the gradient passes unchanged) are transformers' own.
    One thread keeps the training reproducible bit for bit and off the other cores.
    """
    import transformers.integrations.bitnet as tb

    saved = (tb.WeightQuant.forward, tb.ActQuant.forward, torch.get_num_threads())
    tb.WeightQuant.forward = staticmethod(_weight_quant_eager)  # type: ignore[method-assign]
    tb.ActQuant.forward = staticmethod(_act_quant_eager)  # type: ignore[method-assign]
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        tb.WeightQuant.forward, tb.ActQuant.forward = saved[0], saved[1]  # type: ignore[method-assign]
        torch.set_num_threads(saved[2])


def qat_linears(model: Any) -> None:
    """Every nn.Linear except lm_head becomes ``AutoBitLinear(online_quant=True)`` over its float weights."""
    from transformers.integrations.bitnet import AutoBitLinear

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    for name, lin in linears:
        q = AutoBitLinear(lin.in_features, lin.out_features, bias=False, dtype=lin.weight.dtype, online_quant=True)
        with torch.no_grad():
            q.weight.copy_(lin.weight)
        model.set_submodule(name, q)


def plain_linears(model: Any) -> None:
    """Undo :func:`qat_linears`: plain nn.Linear holding the trained latent weights."""
    from transformers.integrations.bitnet import AutoBitLinear

    for name, q in [(n, m) for n, m in model.named_modules() if isinstance(m, AutoBitLinear)]:
        lin = torch.nn.Linear(q.in_features, q.out_features, bias=False, dtype=q.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(q.weight)
        model.set_submodule(name, lin)


def next_token_step(model: Any, opt: Any, sched: Any, ids: torch.Tensor) -> float:
    """One optimiser step of next-token cross-entropy on ``ids`` [batch, seq]; the step's loss."""
    logits = model(input_ids=ids, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return float(loss.detach())


def train_qat(model: Any, chain: MarkovChain, spec: ModelSpec, train: TrainSpec) -> dict[str, Any]:
    """Quantisation-aware training of a float BitNetForCausalLM on ``chain``, in place.

    Every nn.Linear except lm_head runs as transformers' ``AutoBitLinear(online_quant=True)``
    (ternary absmean weights, 8-bit absmax activations, straight-through gradients) over the float
    latent weights; embedding and lm_head are float. The RMSNorm gammas stay frozen at their
    randomised values (a converter that drops one must still be caught). Afterwards the linears are
    plain nn.Linear again holding the trained latent weights, ready for :func:`ternarise_model`.
    Returns the loss curve summary.
    """
    qat_linears(model)
    for name, param in model.named_parameters():
        param.requires_grad_(not name.endswith("norm.weight"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=train.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=train.lr, total_steps=train.steps, pct_start=0.1)
    rng = np.random.default_rng(train.seed + 3000)
    losses: list[float] = []
    model.train()
    with eager_quant_autograd():
        for _ in range(train.steps):
            ids = torch.from_numpy(chain.sample(rng, (train.batch, spec.seq)))
            losses.append(next_token_step(model, opt, sched, ids))
    model.eval()
    plain_linears(model)
    model.requires_grad_(False)
    k = max(1, train.steps // 20)
    return {"loss_first": float(np.mean(losses[:k])), "loss_last": float(np.mean(losses[-k:])),
            "chain_entropy_nats": chain_entropy(chain)}


def chain_entropy(chain: MarkovChain) -> float:
    """Mean next-token entropy (nats) of the chain: the loss a perfect bigram predictor reaches."""
    n = len(chain.tokens)
    total = 0.0
    for i in range(n):
        p: dict[int, float] = {}
        for s, q in zip(chain.succ[i], chain.probs[i], strict=True):
            if q > 0:
                p[int(s)] = p.get(int(s), 0.0) + float(q)
        dist = np.full(n, chain.restart / n)
        for s, q in p.items():
            dist[s] += q
        total += float(-(dist * np.log(dist)).sum())
    return total / n


def build_trained_model(spec: ModelSpec, train: TrainSpec) -> tuple[Any, MarkovChain, dict[str, Any]]:
    """Random init, QAT on the spec's Markov chain, ternarised into spec.form."""
    model, chain, stats = train_float_model(spec, train)
    return ternarise_model(model, spec.form), chain, stats


def train_float_model(spec: ModelSpec, train: TrainSpec,
                      **config_extra: Any) -> tuple[Any, MarkovChain, dict[str, Any]]:
    """Random init and QAT on the spec's Markov chain; the linears stay float (trained latent weights).

    As :func:`random_float_model`, but the RMSNorm gammas are log-normal, ``exp(N(0, gamma_log_std^2))``:
    a trained model's logits are dominated by its embedding -> lm_head path, and gammas of 1 +- 0.1
    would move them too little for a converter that drops one to fail the fp32 parity gate.
    """
    model = random_float_model(spec, **config_extra)
    gen = torch.Generator().manual_seed(spec.seed + 5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.exp(train.gamma_log_std * torch.randn(param.shape, generator=gen)))
    chain = markov_chain(spec.vocab, train)
    stats = train_qat(model, chain, spec, train)
    return model, chain, stats


def gamma_drop_cosines(model: Any, ids: np.ndarray) -> dict[str, float]:
    """Per RMSNorm: cosine of the logits with that gamma replaced by ones vs the intact model's (torch).

    What a converter that dropped the gamma would score against the oracle at best.
    """
    x = ids.reshape(-1, ids.shape[-1])
    base = torch_logits(model, x).astype(np.float64).ravel()
    out: dict[str, float] = {}
    for name, param in model.named_parameters():
        if not name.endswith("norm.weight"):
            continue
        saved = param.detach().clone()
        with torch.no_grad():
            param.fill_(1.0)
        got = torch_logits(model, x).astype(np.float64).ravel()
        with torch.no_grad():
            param.copy_(saved)
        out[name] = float(base @ got / (np.linalg.norm(base) * np.linalg.norm(got)))
    return out


def chain_input_ids(spec: ModelSpec, chain: MarkovChain, train: TrainSpec) -> tuple[np.ndarray, np.ndarray]:
    """Fixture inputs from the chain: ``input_ids`` [batch, seq] and ``eval_input_ids`` [eval_batches, batch, seq]."""
    rng = np.random.default_rng(train.seed + 4000)
    ids = chain.sample(rng, (spec.batch, spec.seq))
    eval_ids = chain.sample(rng, (train.eval_batches, spec.batch, spec.seq))
    return ids, eval_ids

# --- eager replacements for BitLinear's torch.compile'd helpers --------------------------------


def _unpack_weights_eager(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """transformers.integrations.bitnet.unpack_weights without torch.compile, int32 before bit ops."""
    p = packed.to(torch.int32)
    parts = [(p & (3 << (2 * i))) >> (2 * i) for i in range(4)]
    return torch.cat(parts, dim=0).to(dtype) - 1


def _activation_quant_eager(self: Any, input: torch.Tensor, num_bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    qn = -(2 ** (num_bits - 1))
    qp = 2 ** (num_bits - 1) - 1
    scale = qp / input.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
    result = (input * scale).round().clamp(qn, qp)
    return result.to(torch.int8), scale


def _post_quant_process_eager(self: Any, input: torch.Tensor, input_scale: torch.Tensor,
                              weight_scale: torch.Tensor) -> torch.Tensor:
    return input / (input_scale * weight_scale)


@contextlib.contextmanager
def eager_bitlinear_helpers() -> Iterator[None]:
    """Temporarily swap BitLinear's torch.compile'd helpers for eager, exportable ones."""
    import transformers.integrations.bitnet as tb

    saved = (tb.unpack_weights, tb.BitLinear.activation_quant, tb.BitLinear.post_quant_process)
    tb.unpack_weights = _unpack_weights_eager
    tb.BitLinear.activation_quant = _activation_quant_eager
    tb.BitLinear.post_quant_process = _post_quant_process_eager
    try:
        yield
    finally:
        tb.unpack_weights, tb.BitLinear.activation_quant, tb.BitLinear.post_quant_process = saved


class LogitsWrapper(torch.nn.Module):
    """forward(input_ids) -> logits; use_cache=False so no DynamicCache reaches the exporter."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def torch_logits(model: Any, ids: np.ndarray) -> np.ndarray:
    with eager_bitlinear_helpers(), torch.no_grad():
        out = LogitsWrapper(model).eval()(torch.from_numpy(ids))
    return out.detach().float().numpy()


# --- export ----------------------------------------------------------------------------------


def export_program(model: Any, ids: np.ndarray, *, output_name: str | None = "logits", **torch_kwargs: Any) -> Any:
    """``torch.onnx.export(wrapper, (ids,), dynamo=True, **torch_kwargs)`` -> the ``ONNXProgram``.

    Only the settings passed in differ from the exporter's defaults (``optimize=True``, the
    exporter's opset); ``BitLinear``'s compiled helpers are swapped for eager ones meanwhile.
    """
    wrapper = LogitsWrapper(model).eval()
    with eager_bitlinear_helpers(), torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            (torch.from_numpy(ids),),
            dynamo=True,
            input_names=["input_ids"],
            output_names=[output_name] if output_name else None,
            verbose=False,
            **torch_kwargs,
        )
    assert program is not None
    return program


def strip_metadata(ir_model: Any, keep: tuple[str, ...] = ("namespace",)) -> None:
    """Drop the exporter's per-node stack traces / FX node names (absolute paths of this machine:
    not reproducible, and 2/3 of a small model's bytes); keep ``namespace`` (by default), the module
    path and class that produced the node, for humans reading the graph."""
    for node in ir_model.graph.all_nodes():
        for key in [k for k in node.metadata_props if k not in keep]:
            del node.metadata_props[key]


def save_atomic(ir_model: Any, path: Path, *, external_data: bool = False) -> None:
    """Save with onnx-ir into a scratch folder next to the target, then rename; external data (if
    any) is one file ``<name>.data`` whose location is the bare file name, relative to the model."""
    from onnxscript import ir

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    tmp_dir = Path(tempfile.mkdtemp(prefix=".tmp-export-", dir=path.parent))
    try:
        tmp_model = tmp_dir / path.name
        if external_data:
            ir.save(ir_model, tmp_model, external_data=data_name)
            os.replace(tmp_dir / data_name, path.parent / data_name)
        else:
            ir.save(ir_model, tmp_model)
            stale = path.parent / data_name
            if stale.exists():
                stale.unlink()
        os.replace(tmp_model, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def export_onnx(model: Any, ids: np.ndarray, path: Path, *, external_data: bool = False,
                output_name: str | None = "logits", recipe: str = "default") -> dict[str, Any]:
    """Export with the dynamo exporter, save atomically. Returns what the exporter named.

    ``recipe`` (see RECIPES): ``default`` is ``torch.onnx.export(..., dynamo=True)`` with the
    exporter's own optimisation (what users get); ``form`` exports unoptimised and runs the same
    optimizer with its constant-folding input limit lowered below the smallest BitNet weight, so
    every linear keeps the weight form the model is meant to show.
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; supported: {RECIPES}")
    fold_limit: int | None = None
    if recipe == "default":
        program = export_program(model, ids, output_name=output_name)
    else:
        import onnxscript.optimizer
        from transformers.integrations.bitnet import AutoBitLinear, BitLinear

        weight_sizes = [m.weight.numel() for m in model.modules() if isinstance(m, (AutoBitLinear, BitLinear))]
        fold_limit = min([DEFAULT_FOLD_INPUT_LIMIT, *[n - 1 for n in weight_sizes]])
        program = export_program(model, ids, output_name=output_name, optimize=False)
        onnxscript.optimizer.optimize(program.model, input_size_limit=fold_limit)
    ir_model = program.model
    strip_metadata(ir_model)
    names = {
        "inputs": [v.name for v in ir_model.graph.inputs],
        "outputs": [v.name for v in ir_model.graph.outputs],
        "opset": ir_model.opset_imports.get("", None),
        "recipe": recipe,
        "fold_input_limit": fold_limit,
    }
    save_atomic(ir_model, Path(path), external_data=external_data)
    return names


def export_spec(spec: ModelSpec, out_dir: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """Build, run torch, export. Returns (onnx path, input_ids, torch logits)."""
    model = build_model(spec)
    ids = make_input_ids(spec)
    logits = torch_logits(model, ids)
    path = Path(out_dir) / f"{spec.name}.onnx"
    export_onnx(model, ids, path, external_data=spec.external_data, output_name=spec.output_name,
                recipe=spec.recipe)
    return path, ids, logits


# --- checks ----------------------------------------------------------------------------------


def graph_facts(path: Path) -> dict[str, Any]:
    """Input/output names+shapes, opset, op histogram, initializer dtypes of a saved model."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    g = proto.graph

    def shape(vi: Any) -> list[int | str]:
        return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]

    def dtype(vi: Any) -> str:
        return onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name

    init_dtypes = Counter(onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name for t in g.initializer)
    return {
        "inputs": [{"name": v.name, "dtype": dtype(v), "shape": shape(v)} for v in g.input],
        "outputs": [{"name": v.name, "dtype": dtype(v), "shape": shape(v)} for v in g.output],
        "opset": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
        "ir_version": proto.ir_version,
        "producer": f"{proto.producer_name} {proto.producer_version}",
        "op_histogram": dict(sorted(Counter(n.op_type for n in g.node).items(), key=lambda kv: (-kv[1], kv[0]))),
        "node_count": len(g.node),
        "initializer_dtypes": dict(sorted(init_dtypes.items())),
        "external_data": sorted({e.value for t in g.initializer for e in t.external_data if e.key == "location"}),
    }


def parity(reference: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """max-abs, max-abs relative to the reference's range, cosine and argmax agreement."""
    r = reference.astype(np.float64).reshape(-1, reference.shape[-1])
    g = got.astype(np.float64).reshape(-1, got.shape[-1])
    diff = np.abs(r - g)
    cos = float((r.ravel() @ g.ravel()) / (np.linalg.norm(r) * np.linalg.norm(g)))
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "max_rel_to_range": float(diff.max() / (np.abs(r).max() or 1.0)),
        "cosine": cos,
        "argmax_agreement": float((r.argmax(-1) == g.argmax(-1)).mean()),
        "ref_abs_max": float(np.abs(r).max()),
    }


def ort_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: ids})[0])
