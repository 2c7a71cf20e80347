"""All KVP eviction agents of a model as ONE batched network (parameters stacked on an agent axis).

One agent per (layer, KV head), agent index = layer * n_kv_heads + head. Each agent is the paper's network and
reads only what the cache holds, a token's key, value and position (no queries, no attention weights), so it can
score the cache at any time: key → Linear+LayerNorm, value → Linear+LayerNorm, position → embedding+LayerNorm,
concatenate → 2 × [Linear, LayerNorm, SiLU] → Linear → one score per cached token. Every weight
carries a leading agent axis and every layer is a batched matmul (`torch.baddbmm`), so a single forward
scores all heads of all layers; there is no Python loop over agents.

Position features (`PolicyConfig.position_encoding`):
- "absolute": the paper's learned table indexed by the token position, clamped at `max_position − 1`;
- "relative": scale-free features of the position p in a sequence of length L (p/L, log(1+L−1−p) = log
  distance from the end, log(1+p)) through a linear map: defined at any length, for contexts longer than
  the training ones;
- "both": the sum of the two.
Default "relative": trained on 1K-token traces, it ranked best both at 1K and at 2K (longer than trained), with a
third of the parameters: normalized cost 1.204 / 1.219 / 1.211 (relative / absolute / both) at 1K, 2.113 / 2.239
/ 2.205 at 2K, 0.74M / 2.2M / 2.2M parameters for SmolLM2's 90 agents.

Measurements here and in kvpolicy/training/trainer.py were taken on SmolLM2 on a 2-core CPU, with
    kvp traces --source ruler --future-tokens 48 --split train --n 24 --context 1024 --out T
    kvp traces --source ruler --future-tokens 48 --split val --n 8 --context 1024 --out V
    kvp traces --source ruler --future-tokens 48 --split test --n 4 --context 2048 --out T2K
    kvp train --traces T --val V --out C [--position-encoding E | --hidden N | ...]
    kvp bench --sections ranking --traces T --val V [--test T2K] --policy C
(`kvp train` prints its time and best validation reward, minus the cost at 1K; the bench prints the costs on
--test; `kvp bench --sections a --policy C` the share of a 2K-token prefill that scoring every layer takes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kvpolicy.errors import KVPError
from kvpolicy.policy.config import PolicyConfig

N_RELATIVE_FEATURES = 3
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's, kept by the folded RMS norms
HALF_DTYPES = (torch.bfloat16, torch.float16)  # key dtypes the policy computes in directly
MIN_PART_ROWS = 256  # the fewest rows per part worth a thread of its own (`_row_parts`)


def _linear(a: int, fan_in: int, fan_out: int) -> tuple[nn.Parameter, nn.Parameter]:
    """Stacked weights (a, fan_in, fan_out) and biases (a, fan_out), nn.Linear's default initialisation."""
    bound = 1.0 / math.sqrt(fan_in)
    w = torch.empty(a, fan_in, fan_out).uniform_(-bound, bound)
    b = torch.empty(a, fan_out).uniform_(-bound, bound)
    return nn.Parameter(w), nn.Parameter(b)


def _norm(a: int, width: int) -> tuple[nn.Parameter, nn.Parameter]:
    return nn.Parameter(torch.ones(a, width)), nn.Parameter(torch.zeros(a, width))


def _row_parts(agents: int, rows: int, device: torch.device) -> int:
    """How many parts of its rows each agent scores as separate entries of every batched matmul: on CPU, enough that
    the agents x parts of one call divide evenly among the threads, which take one entry each (3 agents on 2
    threads leave one idle a third of the time; 6 half-height entries share them evenly: SmolLM2's 30 layers at 4K
    tokens ranked in 85 ms instead of 105, identical scores). 1 on accelerators, when the agents already divide
    evenly, when the rows do not (the parts are views of the cache, never copies) or are too few to share."""
    if device.type != "cpu":
        return 1
    threads = torch.get_num_threads()
    parts = threads // math.gcd(agents, threads)
    return parts if parts > 1 and rows % parts == 0 and rows >= parts * MIN_PART_ROWS else 1


def _next_positions(positions: torch.Tensor) -> torch.Tensor:
    """(B,) the position of each row's next token from its cached entries' true positions (B, ...): the largest + 1,
    exact whenever the most recent token is cached, which the recent window guarantees (1 for an empty cache)."""
    rows = positions.reshape(positions.shape[0], -1)
    return rows.amax(-1) + 1 if rows.shape[-1] else torch.ones(rows.shape[0], dtype=torch.long, device=rows.device)


class PolicyNet(nn.Module):
    """Scores cached tokens for every agent at once. Parameters: (n_agents, ...) stacks."""

    def __init__(self, config: PolicyConfig):
        super().__init__()
        self.config = config
        a, d, h, pe = config.n_agents, config.head_dim, config.hidden, config.position_dim
        self.key_w, self.key_b = _linear(a, d, h)
        self.key_ln_w, self.key_ln_b = _norm(a, h)
        self.value_w, self.value_b = _linear(a, d, h)
        self.value_ln_w, self.value_ln_b = _norm(a, h)
        if config.position_encoding in ("absolute", "both"):
            self.position_table = nn.Parameter(torch.randn(a, config.max_position, pe))
        if config.position_encoding in ("relative", "both"):
            self.position_w, self.position_b = _linear(a, N_RELATIVE_FEATURES, pe)
        self.position_ln_w, self.position_ln_b = _norm(a, pe)
        hs = config.hidden_state_features if config.hidden_state_dim else 0
        if hs:
            self.state_w, self.state_b = _linear(a, config.hidden_state_dim, hs)
            self.state_ln_w, self.state_ln_b = _norm(a, hs)
        self.fc1_w, self.fc1_b = _linear(a, 2 * h + pe + hs, h)
        self.ln1_w, self.ln1_b = _norm(a, h)
        self.fc2_w, self.fc2_b = _linear(a, h, h)
        self.ln2_w, self.ln2_b = _norm(a, h)
        self.out_w, self.out_b = _linear(a, h, 1)

    def _params(self, agents: slice) -> dict[str, torch.Tensor]:
        return {name: p[agents] for name, p in self.named_parameters()}

    def folded(self, agents: slice, dtype: torch.dtype, parts: int = 1) -> dict[str, torch.Tensor]:
        """`_fold`'s weights of agents `agents` in `dtype`, each agent's repeated `parts` times on the agent axis
        (`_row_parts`). Without autograd (inference) the result is cached until a parameter changes: an in-place
        update bumps its version, and moving the module (`.to(device or dtype)`) gives it new storage, so ranking
        every layer folds each slice once."""
        key = (agents.start, agents.stop, dtype, parts)
        versions = tuple((p._version, p.data_ptr(), p.device) for p in self.parameters())
        cached = self.__dict__.get("_folded_cache", {}).get(key)
        if not torch.is_grad_enabled() and cached is not None and cached[0] == versions:
            return cached[1]
        f = (self._fold(agents, dtype) if parts == 1 else
             {name: w.repeat_interleave(parts, 0) for name, w in self.folded(agents, dtype).items()})
        if not torch.is_grad_enabled():
            self.__dict__.setdefault("_folded_cache", {})[key] = (versions, f)
        return f

    def _fold(self, agents: slice, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The weights of agents `agents` rewritten so that the forward needs no layer-norm centring and no
        key/value/position affine, cast to `dtype` (folded in float32). Exact algebra, per agent:
        - LayerNorm(Wx + b) centres over the output features, and centring is linear: Wx + b − mean_out(Wx + b) =
          W'x + b' with W' = W − mean_out(W), b' = b − mean(b); what remains is an RMS norm (same eps, same biased
          variance);
        - fc1 reads concat(γ·n + β) of the three branch norms n: fc1(...) = Σ n·(γ ⊙ rows of W1) + (b1 + Σ β·W1),
          so γ and β move into fc1 (then centred for ln1 like the others).
        ln1/ln2's affine sits before a SiLU and stays.
        """
        p = {name: w.float() for name, w in self._params(agents).items()}
        h = self.config.hidden

        def centred(w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return w - w.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)

        f: dict[str, torch.Tensor] = {}
        for name in ("key", "value", "fc2") + (("state",) if "state_w" in p else ()):
            f[f"{name}_w"], f[f"{name}_b"] = centred(p[f"{name}_w"], p[f"{name}_b"])
        if "position_table" in p:
            f["position_table"] = p["position_table"] - p["position_table"].mean(-1, keepdim=True)
        if "position_w" in p:
            f["position_w"], f["position_b"] = centred(p["position_w"], p["position_b"])
        w1, b1 = p["fc1_w"], p["fc1_b"]
        pe = self.config.position_dim
        pieces = {"key_ln": w1[:, :h], "value_ln": w1[:, h : 2 * h], "position_ln": w1[:, 2 * h : 2 * h + pe]}
        if "state_w" in p:
            pieces["state_ln"] = w1[:, 2 * h + pe :]
        for name, rows in pieces.items():
            b1 = b1 + torch.bmm(p[f"{name}_b"].unsqueeze(1), rows).squeeze(1)
        w1 = torch.cat([p[f"{name}_w"].unsqueeze(-1) * rows for name, rows in pieces.items()], 1)
        f["fc1_w"], f["fc1_b"] = centred(w1, b1)
        for name in ("ln1_w", "ln1_b", "ln2_w", "ln2_b", "out_w", "out_b"):
            f[name] = p[name]
        return {name: w.to(dtype) for name, w in f.items()}

    def position_features(self, positions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Scale-free features (..., 3): p/L, log(1 + L−1−p), log(1 + p); positions (...), lengths broadcastable."""
        p = positions.float()
        length = lengths.float().expand_as(p)
        return torch.stack([p / length, torch.log1p((length - 1 - p).clamp_min(0)), torch.log1p(p)], -1)

    def forward(
        self,
        keys: torch.Tensor | Sequence[torch.Tensor],
        values: torch.Tensor | Sequence[torch.Tensor],
        positions: torch.Tensor,
        lengths: torch.Tensor,
        agents: slice = slice(None),
        states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores (A', B, T) float32 for the agents `agents` (A' of them, default all).

        states: (L', B, T, hidden_size) the layers' input hidden states of the tokens, for a policy that reads them
        (L' = A' / n_kv_heads: `agents` covers whole layers).
        keys, values: (A', B, T, head_dim), post-RoPE, any float dtype, or per layer of the agents (H, B, T, head_dim)
        each (`score_layers`: each layer's cache is read where it is, never copied into one stack); positions: (A', B,
        T) int64 true token
        positions (or (1, B, T), shared by all agents); lengths: tokens in each sequence so far (the position
        of the next token), broadcastable to positions, e.g. (1, B, 1). Matmuls run in the dtype of `keys` when it
        is bfloat16 or float16 (cheaper), otherwise float32. Computed with the folded weights (`folded`): the
        paper's layer norms become RMS norms, 3.5x cheaper here; tests hold it to the plain per-agent network.
        """
        per_layer = not isinstance(keys, torch.Tensor)
        first = keys[0] if per_layer else keys
        a, (b, t, d) = (len(keys) * first.shape[0] if per_layer else first.shape[0]), first.shape[1:]
        if d != self.config.head_dim:
            raise KVPError(f"policy expects head_dim {self.config.head_dim}, got keys with last dim {d}")
        dtype = first.dtype if first.dtype in HALF_DTYPES else torch.float32
        rows = b * t
        parts = _row_parts(a, rows, first.device)
        f = self.folded(agents, dtype, parts)  # every (agent, part) is one entry of each batched matmul

        def linear(x: torch.Tensor, name: str) -> torch.Tensor:
            return torch.baddbmm(f[f"{name}_b"].unsqueeze(1), x, f[f"{name}_w"])

        def embed(x: torch.Tensor | Sequence[torch.Tensor], name: str) -> torch.Tensor:
            """(A'·parts, B*T / parts, hidden): the key or value branch's linear map, one matmul per layer's part when
            in parts."""
            if not per_layer:
                return linear(x.reshape(a * parts, rows // parts, d).to(dtype), name)
            w, bias = f[f"{name}_w"], f[f"{name}_b"].unsqueeze(1)
            out = torch.empty(a * parts, rows // parts, w.shape[-1], dtype=dtype, device=w.device)
            start = 0
            for part in x:
                entries = slice(start, start + part.shape[0] * parts)
                torch.baddbmm(bias[entries], part.reshape(entries.stop - start, rows // parts, d).to(dtype),
                              w[entries], out=out[entries])
                start = entries.stop
            return out

        def split(x: torch.Tensor) -> torch.Tensor:  # (A', B*T, width) -> (A'·parts, B*T / parts, width), a view
            return x.reshape(a * parts, rows // parts, x.shape[-1])

        inplace = not torch.is_grad_enabled()  # inference overwrites each activation it has read for the last time

        def rms(x: torch.Tensor) -> torch.Tensor:  # F.rms_norm, in two kernels instead of its CPU decomposition's six
            norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
            if inplace:
                return x.mul_(norm.square_().div_(x.shape[-1]).add_(LAYER_NORM_EPS).rsqrt_())
            return x * torch.rsqrt(norm.square() / x.shape[-1] + LAYER_NORM_EPS)

        def affine_silu(x: torch.Tensor, name: str) -> torch.Tensor:
            y = torch.addcmul(f[f"{name}_b"].unsqueeze(1), x, f[f"{name}_w"].unsqueeze(1), out=x if inplace else None)
            return F.silu(y, inplace=inplace)

        h = self.config.hidden
        whole = self.folded(agents, dtype)  # one entry per agent: the position and hidden-state maps run unsplit
        k = rms(embed(keys, "key"))
        v = rms(embed(values, "value"))
        pos = rms(split(self._position_embedding(whole, positions, lengths, (a, b, t)).to(dtype)))
        # fc1 over concat([k, v, pos]), as three matmuls accumulated in place: no concatenated copy, no extra
        # output (autograd allows it: a matmul's backward does not read its output)
        w1 = f["fc1_w"]
        x = torch.baddbmm(f["fc1_b"].unsqueeze(1), k, w1[:, :h])
        pe = self.config.position_dim
        x = x.baddbmm_(v, w1[:, h : 2 * h]).baddbmm_(pos, w1[:, 2 * h : 2 * h + pe])
        if "state_w" in f:
            states_in = split(self._state_features(whole, states, (a, b, t)).to(dtype))
            x = x.baddbmm_(rms(states_in), w1[:, 2 * h + pe :])
        x = affine_silu(rms(x), "ln1")
        x = affine_silu(rms(linear(x, "fc2")), "ln2")
        return linear(x, "out").squeeze(-1).float().reshape(a, b, t)

    def _state_features(self, f: dict[str, torch.Tensor], states: torch.Tensor | None, shape: tuple) -> torch.Tensor:
        """(A', B*T, features): each agent's projection of its layer's hidden states (L', B, T, D), one matmul per
        layer for all its heads."""
        a, b, t = shape
        heads = self.config.n_kv_heads
        if states is None or states.shape[0] * heads != a or states.shape[1:3] != (b, t):
            raise KVPError("this policy reads the layers' input hidden states: pass states (L', B, T, hidden_size)")
        w, n_layers = f["state_w"], a // heads
        d, feats = w.shape[1], w.shape[2]
        w = w.reshape(n_layers, heads, d, feats).permute(0, 2, 1, 3).reshape(n_layers, d, heads * feats)
        x = torch.bmm(states.reshape(n_layers, b * t, d).to(w.dtype), w)  # (L', B*T, H*f)
        x = x.reshape(n_layers, b * t, heads, feats).permute(0, 2, 1, 3).reshape(a, b * t, feats)
        return x + f["state_b"].unsqueeze(1)

    def _position_embedding(
        self, f: dict[str, torch.Tensor], positions: torch.Tensor, lengths: torch.Tensor, shape: tuple
    ) -> torch.Tensor:
        """(A', B*T, position_dim) from positions (A' or 1, B, T), with the folded weights `f`."""
        a, b, t = shape
        out = 0
        if "position_table" in f:
            table = f["position_table"]  # (A', P, pe)
            offsets = torch.arange(a, device=positions.device)[:, None] * table.shape[1]
            idx = positions.expand(a, b, t).reshape(a, b * t).clamp(0, self.config.max_position - 1) + offsets
            out = F.embedding(idx, table.reshape(-1, table.shape[-1]))
        if "position_w" in f:
            feats = self.position_features(positions, lengths).reshape(-1, b * t, N_RELATIVE_FEATURES)
            w = f["position_w"]
            out = out + torch.matmul(feats.to(w.dtype), w) + f["position_b"].unsqueeze(1)  # broadcasts shared rows
        return out

    def score_layer(
        self,
        layer: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        lengths: torch.Tensor | None = None,
        states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Score one layer's cache with that layer's agents.

        keys, values: (B, H, T, head_dim) with H = n_kv_heads; positions: (B, H, T) int64; lengths: (B,) tokens
        seen so far (default: the largest cached position + 1 per row, exact whenever the most recent token is
        cached, which the recent window guarantees); states: (B, T, hidden) the layer's input hidden states of the
        cached tokens, for a policy that reads them. Returns (B, H, T) float32, higher = keep.
        """
        cfg = self.config
        bsz, h, t, _ = keys.shape
        if not 0 <= layer < cfg.n_layers or h != cfg.n_kv_heads:
            raise KVPError(
                f"policy was trained for {cfg.n_layers} layers x {cfg.n_kv_heads} KV heads; "
                f"got layer {layer} with {h} KV heads: use a checkpoint trained on this model (on a model with "
                "sliding-window layers, give EvictingCache config=model.config so that only the others are scored)"
            )
        if lengths is None:
            lengths = _next_positions(positions)
        agents = slice(layer * cfg.n_kv_heads, (layer + 1) * cfg.n_kv_heads)
        scores = self(
            keys.transpose(0, 1),
            values.transpose(0, 1),
            positions.transpose(0, 1),
            lengths.reshape(1, bsz, 1),
            agents,
            None if states is None else states.unsqueeze(0),
        )
        return scores.transpose(0, 1)

    @torch.no_grad()
    def score_layers(
        self,
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        positions: Sequence[torch.Tensor],
        lengths: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Score every layer's cache with all agents in one forward: `score_layer` for each layer, with one launch of
        each matmul for all layers after the key and value maps (on an accelerator, the launches of many small
        kernels, not the arithmetic, are what scoring layer by layer pays; on CPU the per-layer activations' cache
        locality wins instead; inference only, no autograd). keys, values: per layer (B, H, T,
        head_dim), every layer of the model, all of one shape; positions: per layer (B, H, T); lengths: as in
        `score_layer`. Returns per layer (B, H, T) float32, higher = keep."""
        cfg = self.config
        shape = keys[0].shape
        if len(keys) != cfg.n_layers or any(k.shape != shape or v.shape != shape for k, v in zip(keys, values)):
            raise KVPError(f"score_layers takes all {cfg.n_layers} layers' caches of one shape; got {len(keys)} "
                           "layers: score layers of different lengths one at a time (score_layer)")
        bsz, h, t, _ = shape
        if h != cfg.n_kv_heads:
            raise KVPError(f"policy was trained for {cfg.n_kv_heads} KV heads; got {h}: use a checkpoint trained on "
                           "this model")
        stacked = torch.stack(list(positions))  # (L, B, H, T)
        if lengths is None:
            lengths = _next_positions(stacked.transpose(0, 1))
        scores = self([k.transpose(0, 1) for k in keys], [v.transpose(0, 1) for v in values],
                      stacked.permute(0, 2, 1, 3).reshape(cfg.n_agents, bsz, t), lengths.reshape(1, bsz, 1))
        return list(scores.reshape(cfg.n_layers, h, bsz, t).transpose(1, 2))

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
