"""Property tests for the KV cache and the Wan DiT: each test is named after the law it checks.

The defining law (``../shared/DESIGN.md`` section 2, ``kv_cache``): chunk-wise attention through the cache equals
one block-causal masked attention over the whole sequence with the policy's mask, for every memory policy and
every chunking. It is checked on a bare attention layer and on a tiny causal :class:`WanModel`; then
autoregressive generation with a cache equals recomputing from the prefix, RoPE's relative-position laws, window
relative RoPE, error messages, and the Wan presets' exact sizes (on the meta device). Everything runs in float64
on one thread; torch randomness comes from generators seeded by hypothesis-drawn integers.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.testing import assert_close

from salt_ref.kv_cache import KVCache, MemoryPolicy, attention_mask, frame_mask
from salt_ref.models.wan import WanConfig, WanModel, apply_rope, rope_angles, rope_frequencies
from salt_ref.schedule import sigma_to_t

F64 = torch.float64
HW = (8, 8)  # latent frame size of the tiny model: 4 x 4 = 16 tokens per frame
TPF = (HW[0] // 2) * (HW[1] // 2)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- strategies

seeds = st.integers(min_value=0, max_value=2**32 - 1)


@st.composite
def policies(draw, max_window: int = 4, max_sink: int = 2) -> MemoryPolicy:
    kind = draw(st.sampled_from(["full", "window", "sink"]))
    if kind == "full":
        return MemoryPolicy()
    n = draw(st.integers(1, max_window))
    if kind == "window":
        return MemoryPolicy("window", n)
    return MemoryPolicy("sink", n, draw(st.integers(1, max_sink)))


@st.composite
def chunkings(draw, policy: MemoryPolicy, max_frames: int, max_chunk: int = 3) -> list[tuple[int, int]]:
    """Random chunk bounds ``[(s, e), ...]`` covering ``[0, F)``, each chunk no longer than the window."""
    longest = min(max_chunk, policy.window) if policy.bounded else max_chunk
    lengths = draw(st.lists(st.integers(1, longest), min_size=1, max_size=max_frames))
    bounds, s = [], 0
    for n in lengths:
        if s + n > max_frames:
            break
        bounds.append((s, s + n))
        s += n
    return bounds


@st.composite
def policy_and_chunks(draw, max_frames: int = 7, max_window: int = 4, max_sink: int = 2):
    policy = draw(policies(max_window, max_sink))
    return policy, draw(chunkings(policy, max_frames))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ tiny model


@functools.cache
def _tiny(causal: bool = True, rope_max_len: int = 1024) -> WanModel:
    """A 2-layer float64 Wan DiT on 8x8 latent frames (shared, never trained, always in eval mode)."""
    cfg = WanConfig.preset(
        "tiny",
        dim=48,
        ffn_dim=96,
        freq_dim=32,
        text_dim=16,
        text_len=4,
        num_heads=4,
        num_layers=2,
        causal=causal,
        rope_max_len=rope_max_len,
    )
    torch.manual_seed(0)
    return WanModel(cfg).double().eval()


def _inputs(model: WanModel, n_frames: int, seed: int, batch: int = 1) -> tuple[Tensor, Tensor]:
    """Noise ``[B, C, F, H, W]`` and a text context ``[B, 3, text_dim]``."""
    g, cfg = _gen(seed), model.config
    x = torch.randn(batch, cfg.in_dim, n_frames, *HW, generator=g, dtype=F64)
    ctx = torch.randn(batch, 3, cfg.text_dim, generator=g, dtype=F64)
    return x, ctx


SIGMAS = (1.0, 0.5, 0.0)  # two Euler steps from noise to data


@torch.no_grad()
def _generate_cached(
    model: WanModel, noise: Tensor, ctx: Tensor, bounds, policy: MemoryPolicy | str, rope: str = "absolute"
) -> Tensor:
    """Chunk-wise generation through a KV cache: 2 Euler steps per chunk, then a context pass at t=0."""
    b = noise.shape[0]
    cache = model.new_cache(policy, batch=b, frames_hw=HW, max_frames=noise.shape[2], rope=rope)
    out = []
    for s, e in bounds:
        x = noise[:, :, s:e]
        for hi, lo in zip(SIGMAS[:-1], SIGMAS[1:], strict=True):
            t = sigma_to_t(torch.full((b, e - s), hi, dtype=F64))
            x = x - (hi - lo) * model(x, t, ctx, kv_cache=cache, start_frame=s)
        model(x, torch.zeros(b, e - s, dtype=F64), ctx, kv_cache=cache, start_frame=s, commit=True)
        out.append(x)
    return torch.cat(out, dim=2)


@torch.no_grad()
def _generate_recomputed(model: WanModel, noise: Tensor, ctx: Tensor, bounds) -> Tensor:
    """The same generation without a cache: each prediction recomputed from the clean prefix at t=0."""
    b = noise.shape[0]
    clean = noise[:, :, :0]
    for c, (s, e) in enumerate(bounds):
        x = noise[:, :, s:e]
        for hi, lo in zip(SIGMAS[:-1], SIGMAS[1:], strict=True):
            t = torch.cat([torch.zeros(b, s, dtype=F64), sigma_to_t(torch.full((b, e - s), hi, dtype=F64))], dim=1)
            v = model(torch.cat([clean, x], dim=2), t, ctx, chunk_bounds=bounds[: c + 1])[:, :, s:e]
            x = x - (hi - lo) * v
        clean = torch.cat([clean, x], dim=2)
    return clean


# ---------------------------------------------------------------------------- 1. the defining law of the cache


def _softmax_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Plain ``softmax(q k^T / sqrt(D)) v`` over ``[B, L, H, D]`` tensors (no mask)."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


@given(pc=policy_and_chunks(), rope=st.sampled_from(["none", "absolute", "relative"]), seed=seeds)
@settings(max_examples=60)
def test_chunkwise_attention_through_cache_equals_masked_attention(pc, rope, seed):
    policy, bounds = pc
    if rope == "relative" and policy.kind == "sink":
        rope = "absolute"  # relative RoPE with a sink differs from the mask by design (tested below)
    g = _gen(seed)
    b, h, d, hw = 2, 2, 8, (1, 3)
    tpf, n_frames = hw[0] * hw[1], bounds[-1][1]
    q, k, v = (torch.randn(b, n_frames * tpf, h, d, generator=g, dtype=F64) for _ in range(3))
    freqs = rope_frequencies(d, max_len=16)

    def angles(frame_pos: Tensor) -> Tensor:
        return rope_angles(freqs, d, frame_pos, *hw)

    # reference: one masked attention over the whole sequence (absolute RoPE where any)
    qr, kr = q, k
    if rope != "none":
        ang = angles(torch.arange(n_frames))
        qr, kr = apply_rope(q, ang), apply_rope(k, ang)
    mask = attention_mask(bounds, policy, tpf)
    ref = F.scaled_dot_product_attention(
        qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    ).transpose(1, 2)

    cache = KVCache(
        policy,
        batch=b,
        heads=h,
        head_dim=d,
        tokens_per_frame=tpf,
        max_frames=n_frames,
        rope="absolute" if rope == "none" else rope,
        dtype=F64,
    )
    outs = []
    for s, e in bounds:
        sl = slice(s * tpf, e * tpf)
        k_all, v_all, key_frames = cache.view(k[:, sl], v[:, sl], s)
        assert key_frames.shape == (k_all.shape[1],)
        # the view holds exactly the frames the mask lets this chunk see, in order
        assert key_frames[::tpf].tolist() == frame_mask(bounds, policy)[s].nonzero().flatten().tolist()
        qc = q[:, sl]
        if rope != "none":
            key_pos, query_pos = cache.positions(key_frames, e - s)
            qc, k_all = apply_rope(qc, angles(query_pos[::tpf])), apply_rope(k_all, angles(key_pos[::tpf]))
        outs.append(_softmax_attention(qc, k_all, v_all))
        cache.commit(k[:, sl], v[:, sl], s)
    assert_close(torch.cat(outs, dim=1), ref, rtol=1e-10, atol=1e-10)


@given(pc=policy_and_chunks(max_frames=6, max_window=3), seed=seeds)
@settings(max_examples=20)
def test_chunkwise_model_through_cache_equals_masked_causal_forward(pc, seed):
    """The same law at model level: a causal Wan DiT chunk by chunk (per-chunk t) equals one masked forward."""
    policy, bounds = pc
    model = _tiny()
    x, ctx = _inputs(model, bounds[-1][1], seed)
    t_chunks = torch.rand(len(bounds), generator=_gen(seed + 1), dtype=F64) * 1000
    t = torch.cat([t_chunks[c].expand(1, e - s) for c, (s, e) in enumerate(bounds)], dim=1)
    with torch.no_grad():
        ref = model(x, t, ctx, chunk_bounds=bounds, policy=policy)
        cache = model.new_cache(policy, batch=1, frames_hw=HW, max_frames=bounds[-1][1], rope="absolute")
        outs = [model(x[:, :, s:e], t[:, s:e], ctx, kv_cache=cache, start_frame=s, commit=True) for s, e in bounds]
    assert_close(torch.cat(outs, dim=2), ref, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------- 2. generation: cache == recomputation


@given(lengths=st.lists(st.integers(1, 2), min_size=2, max_size=3), batch=st.integers(1, 2), seed=seeds)
@settings(max_examples=10)
def test_causal_generation_with_full_cache_equals_recompute_without_cache(lengths, batch, seed):
    bounds, s = [], 0
    for n in lengths:
        bounds.append((s, s + n))
        s += n
    model = _tiny()
    noise, ctx = _inputs(model, s, seed, batch)
    cached = _generate_cached(model, noise, ctx, bounds, MemoryPolicy())
    recomputed = _generate_recomputed(model, noise, ctx, bounds)
    assert cached.shape == noise.shape
    assert_close(cached, recomputed, rtol=1e-5, atol=1e-5)
    assert (cached - noise).abs().max() > 1e-2  # the model actually did something


# -------------------------------------------------------------------------------------------- 3. RoPE laws


@given(
    head_dim=st.sampled_from([6, 8, 12, 16]),
    n_frames=st.integers(1, 4),
    hw=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    delta=st.integers(-5, 20),
    seed=seeds,
)
def test_rope_relative_position_property(head_dim, n_frames, hw, delta, seed):
    g = _gen(seed)
    freqs = rope_frequencies(head_dim, max_len=64)
    f_q = torch.randint(5, 30, (n_frames,), generator=g)
    f_k = torch.randint(5, 30, (n_frames,), generator=g)
    L = n_frames * hw[0] * hw[1]
    q, k = (torch.randn(2, L, 3, head_dim, generator=g, dtype=F64) for _ in range(2))

    def scores(fq: Tensor, fk: Tensor) -> Tensor:
        qr = apply_rope(q, rope_angles(freqs, head_dim, fq, *hw))
        kr = apply_rope(k, rope_angles(freqs, head_dim, fk, *hw))
        return torch.einsum("bqhd,bkhd->bhqk", qr, kr)

    # dot products depend only on position differences: shifting every frame position changes nothing
    assert_close(scores(f_q + delta, f_k + delta), scores(f_q, f_k), rtol=1e-9, atol=1e-9)

    # rotations compose by adding angles, and preserve the norm of every (real, imag) pair
    a = rope_angles(freqs, head_dim, f_q, *hw)
    b = torch.randn(a.shape, generator=g, dtype=F64) * 10
    assert_close(apply_rope(apply_rope(q, a), b), apply_rope(q, a + b), rtol=1e-9, atol=1e-9)
    pair_norm = lambda y: y.unflatten(-1, (-1, 2)).norm(dim=-1)  # noqa: E731
    assert_close(pair_norm(apply_rope(q, a)), pair_norm(q), rtol=1e-12, atol=1e-12)
    assert_close(apply_rope(q, torch.zeros_like(a)), q)
    # and position (0, 0, 0) is the identity rotation
    origin = rope_angles(freqs, head_dim, torch.zeros(1, dtype=torch.long), 1, 1)
    assert_close(origin, torch.zeros(1, head_dim // 2, dtype=F64))


def test_rope_angles_reject_positions_past_the_table():
    freqs = rope_frequencies(8, max_len=4)
    with pytest.raises(ValueError, match="RoPE table of 4"):
        rope_angles(freqs, 8, torch.tensor([3, 4]), 1, 1)
    with pytest.raises(ValueError, match="RoPE table"):
        rope_angles(freqs, 8, torch.tensor([0]), 5, 1)


# -------------------------------------------------------------------------------- 4. window-relative RoPE


@given(
    window=st.integers(2, 3),
    lengths=st.lists(st.integers(1, 2), min_size=3, max_size=4),
    seed=seeds,
)
@settings(max_examples=10)
def test_window_relative_rope_equals_absolute_for_window_policy(window, lengths, seed):
    bounds, s = [], 0
    for n in lengths:
        bounds.append((s, s + n))
        s += n
    model = _tiny()
    noise, ctx = _inputs(model, s, seed)
    policy = MemoryPolicy("window", window)
    absolute = _generate_cached(model, noise, ctx, bounds, policy, rope="absolute")
    relative = _generate_cached(model, noise, ctx, bounds, policy, rope="relative")
    assert_close(relative, absolute, rtol=1e-5, atol=1e-5)


def test_window_relative_rope_differs_for_sink_policy_once_frames_are_evicted():
    model = _tiny()
    bounds = [(0, 1), (1, 2), (2, 3), (3, 4)]
    noise, ctx = _inputs(model, 4, seed=7)
    policy = MemoryPolicy.parse("sink:1+window:2")
    absolute = _generate_cached(model, noise, ctx, bounds, policy, rope="absolute")
    relative = _generate_cached(model, noise, ctx, bounds, policy, rope="relative")
    # until a frame has been evicted (chunks 0-2 see frames 0..e-1 contiguously) the two agree ...
    assert_close(relative[:, :, :3], absolute[:, :, :3], rtol=1e-5, atol=1e-5)
    # ... the last chunk sees the sink frame 0 and frame 2 (frame 1 evicted): positions 0,1,2 versus 0,2,3
    assert (relative[:, :, 3] - absolute[:, :, 3]).abs().max() > 1e-4


def test_window_relative_rope_generates_past_rope_max_len():
    model = _tiny(rope_max_len=8)
    bounds = [(s, s + 2) for s in range(0, 12, 2)]
    noise, ctx = _inputs(model, 12, seed=3)
    video = _generate_cached(model, noise, ctx, bounds, MemoryPolicy.parse("window:4"), rope="relative")
    assert video.shape == noise.shape and torch.isfinite(video).all()
    with pytest.raises(ValueError, match="RoPE table"):
        _generate_cached(model, noise, ctx, bounds, MemoryPolicy.parse("window:4"), rope="absolute")
    with pytest.raises(ValueError, match="RoPE table"):
        model(noise, torch.zeros(1), ctx)  # nor can a cache-free causal forward hold 12 frames


# --------------------------------------------------------------------------------------------------- 5. errors


def _cache(policy: str = "full", **kw) -> KVCache:
    args = dict(batch=2, heads=3, head_dim=4, tokens_per_frame=5, max_frames=4, dtype=F64)
    args.update(kw)
    return KVCache(MemoryPolicy.parse(policy), **args)


def _kv(frames: int, batch: int = 2, heads: int = 3, head_dim: int = 4, tpf: int = 5, extra: int = 0):
    k = torch.randn(batch, frames * tpf + extra, heads, head_dim, dtype=F64)
    return k, torch.randn_like(k)


def test_full_cache_overflow_raises():
    cache = _cache("full", max_frames=4)
    cache.commit(*_kv(3), 0)
    with pytest.raises(ValueError, match="overflow"):
        cache.commit(*_kv(2), 3)
    cache.commit(*_kv(1), 3)  # exactly full is fine
    assert cache.n_held == 4
    with pytest.raises(ValueError, match="max_frames"):
        KVCache(MemoryPolicy(), batch=1, heads=1, head_dim=2, tokens_per_frame=1)


@pytest.mark.parametrize("method", ["view", "commit"])
def test_cache_rejects_malformed_chunks(method):
    cache = _cache("window:2")
    cache.commit(*_kv(1), 0)
    call = getattr(cache, method)
    with pytest.raises(ValueError, match="whole number of 5-token frames"):
        call(*_kv(1, extra=2), 1)
    for kw in (dict(batch=1), dict(heads=2), dict(head_dim=6)):
        with pytest.raises(ValueError, match=r"batch/heads/head_dim .* cache holds \(2, 3, 4\)"):
            call(*_kv(1, **kw), 1)
    k, v = _kv(1)
    with pytest.raises(ValueError, match=r"must both be \[B, L, H, D\]"):
        call(k, v[:, :, :, :2], 1)
    with pytest.raises(ValueError, match=r"must both be \[B, L, H, D\]"):
        call(k[0], v[0], 1)
    for wrong in (0, 2):
        with pytest.raises(ValueError, match=f"starts at frame {wrong}, but the cache expects frame 1"):
            call(*_kv(1), wrong)
    with pytest.raises(ValueError, match="3 frames does not fit a window of 2 frames"):
        call(*_kv(3), 1)
    assert cache.n_held == 1 and cache.next_frame == 1  # nothing was changed by the failed calls


def test_masks_reject_chunks_longer_than_the_window():
    with pytest.raises(ValueError, match="longer than the attention window of 2 frames"):
        frame_mask([(0, 1), (1, 4)], MemoryPolicy("window", 2))
    with pytest.raises(ValueError, match="longer than the attention window"):
        attention_mask([(0, 3)], MemoryPolicy("sink", 2, 1), 4)
    model = _tiny()
    x, ctx = _inputs(model, 4, seed=0)
    with pytest.raises(ValueError, match="longer than the attention window"):
        model(x, torch.zeros(1), ctx, chunk_bounds=[(0, 4)], policy=MemoryPolicy("window", 3))


def test_cache_rope_mode_is_checked():
    with pytest.raises(ValueError, match="rope must be 'absolute' or 'relative'"):
        _cache(rope="rotary")


@given(policy=policies(max_window=40, max_sink=10))
def test_memory_policy_parse_round_trips(policy):
    assert MemoryPolicy.parse(str(policy)) == policy
    assert MemoryPolicy.parse(f"  {str(policy).upper()} ") == policy


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "none",
        "window",
        "window:",
        "window:-1",
        "window:0",
        "sink:0+window:3",
        "sink:2",
        "window:3+sink:2",
        "full:3",
        "window:2.5",
        "sink:1+window:0",
    ],
)
def test_memory_policy_parse_rejects_garbage(spec):
    with pytest.raises(ValueError):
        MemoryPolicy.parse(spec)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kind="lru"),
        dict(kind="full", window=3),
        dict(kind="window"),
        dict(kind="window", window=2, sink=1),
        dict(kind="sink", window=2),
        dict(kind="full", sink=1),
    ],
)
def test_memory_policy_rejects_inconsistent_fields(kwargs):
    with pytest.raises(ValueError):
        MemoryPolicy(**kwargs)


@given(policy=policies(max_window=4, max_sink=3).filter(lambda p: p.bounded), data=st.data())
@settings(max_examples=20)
def test_bounded_caches_never_reallocate_and_hold_at_most_sink_plus_window(policy, data):
    bounds = data.draw(chunkings(policy, max_frames=30, max_chunk=4))
    cache = _cache(str(policy), max_frames=None)
    k_ptr, v_ptr, k_shape = cache.k.data_ptr(), cache.v.data_ptr(), cache.k.shape
    assert k_shape[1] == (policy.sink + policy.window) * 5
    for s, e in bounds:
        k, v = _kv(e - s)
        cache.commit(k, v, s)
        assert cache.n_held <= policy.sink + policy.window
        held = cache.frames[: cache.n_held].tolist()
        # the held frames are the sink frames and the last `window` frames, in order, with their keys in place
        expected = [g for g in range(e) if g < policy.sink or g >= e - policy.window]
        assert held == expected
        assert_close(cache.k[:, (cache.n_held - (e - s)) * 5 : cache.n_held * 5], k)
    assert (cache.k.data_ptr(), cache.v.data_ptr(), cache.k.shape) == (k_ptr, v_ptr, k_shape)


# ------------------------------------------------------------------------------------------ 6-8. the Wan DiT


@pytest.mark.parametrize(
    ("preset", "n_params", "n_keys"), [("1.3B", 1_418_996_800, 825), ("14B", 14_288_491_584, 1095)]
)
def test_wan_parameter_counts_on_meta_device(preset, n_params, n_keys):
    with torch.device("meta"):
        model = WanModel(WanConfig.preset(preset))
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert len(model.state_dict()) == n_keys
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("causal", [False, True])
def test_wan_features_are_block_outputs(causal):
    model = _tiny(causal=causal)
    x, ctx = _inputs(model, 3, seed=1, batch=2)
    t = torch.tensor([100.0, 700.0], dtype=F64)
    hooked: dict[int, Tensor] = {}
    handles = [
        blk.register_forward_hook(lambda _m, _i, out, i=i: hooked.__setitem__(i, out))
        for i, blk in enumerate(model.blocks)
    ]
    try:
        with torch.no_grad():
            plain = model(x, t, ctx)
            out, feats = model(x, t, ctx, features=(1, 0))
    finally:
        for hd in handles:
            hd.remove()
    assert_close(out, plain, rtol=0, atol=0)  # asking for features leaves the flow unchanged
    assert sorted(feats) == [0, 1]
    n_tokens = 3 * TPF
    for i, z in feats.items():
        assert z.shape == (2, n_tokens, model.config.dim)
        assert_close(z, hooked[i].reshape(2, n_tokens, -1), rtol=0, atol=0)


def test_wan_input_validation_names_expected_shapes():
    model = _tiny()
    x, ctx = _inputs(model, 2, seed=0, batch=2)
    t = torch.zeros(2, dtype=F64)
    with pytest.raises(ValueError, match=r"x must be \[B, 3, F, H, W\], got \(2, 3, 8, 8\)"):
        model(x[:, :, 0], t, ctx)
    with pytest.raises(ValueError, match=r"x must be \[B, 3, F, H, W\], got \(2, 4, 2, 8, 8\)"):
        model(torch.cat([x, x[:, :1]], dim=1), t, ctx)
    with pytest.raises(ValueError, match=r"must be multiples of the patch \(1, 2, 2\)"):
        model(x[..., :7], t, ctx)
    with pytest.raises(ValueError, match=r"t must be \[B\]=2 or \[B, F\]=\(2, 2\), got \(3,\)"):
        model(x, torch.zeros(3), ctx)
    with pytest.raises(ValueError, match=r"t must be \[B\]=2 or \[B, F\]=\(2, 2\), got \(2, 3\)"):
        model(x, torch.zeros(2, 3), ctx)
    with pytest.raises(ValueError, match=r"context must be \[B, <= 4, 16\], got \(2, 3, 15\)"):
        model(x, t, ctx[..., :15])
    with pytest.raises(ValueError, match=r"context must be \[B, <= 4, 16\], got \(1, 3, 16\)"):
        model(x, t, ctx[:1])
    with pytest.raises(ValueError, match="5 tokens, more than text_len=4"):
        model(x, t, torch.cat([ctx, ctx[:, :2]], dim=1))
    with pytest.raises(ValueError, match="needs a kv_cache"):
        model(x, t, ctx, commit=True)
    bidirectional = _tiny(causal=False)
    with pytest.raises(ValueError, match=r"causal model \(WanConfig\(causal=True\)\)"):
        bidirectional(x, t, ctx, kv_cache=model.new_cache(MemoryPolicy(), batch=2, frames_hw=HW, max_frames=2))
    with pytest.raises(ValueError, match="kv_cache has 1 layers, the model 2"):
        model(x, t, ctx, kv_cache=model.new_cache(MemoryPolicy(), batch=2, frames_hw=HW, max_frames=2)[:1])


# Literal masks for three 2-frame chunks (query frame rows, key frame columns): written out by hand from the
# policy definitions, so a policy that keeps one frame too many or too few fails here even though every other
# test compares the cache with the same kept_frames rule.
_BOUNDS = [(0, 2), (2, 4), (4, 6)]
_LITERAL = {
    "full": ["110000", "110000", "111100", "111100", "111111", "111111"],
    "window:3": ["110000", "110000", "011100", "011100", "000111", "000111"],
    "window:2": ["110000", "110000", "001100", "001100", "000011", "000011"],
    "sink:1+window:3": ["110000", "110000", "111100", "111100", "100111", "100111"],
    "sink:2+window:2": ["110000", "110000", "111100", "111100", "110011", "110011"],
}


@pytest.mark.parametrize("spec", sorted(_LITERAL))
def test_each_policy_keeps_exactly_the_literal_frames(spec):
    want = torch.tensor([[c == "1" for c in row] for row in _LITERAL[spec]])
    assert torch.equal(frame_mask(_BOUNDS, MemoryPolicy.parse(spec)), want)


@pytest.mark.parametrize("spec", sorted(_LITERAL))
def test_the_cache_reads_exactly_the_literal_frames(spec):
    policy = MemoryPolicy.parse(spec)
    cache = KVCache(policy, batch=1, heads=1, head_dim=2, tokens_per_frame=1, max_frames=6)
    for s, e in _BOUNDS:
        k = torch.zeros(1, e - s, 1, 2)
        _, _, frames = cache.view(k, k, s)
        want = [g for g, c in enumerate(_LITERAL[spec][s]) if c == "1"]
        assert frames.tolist() == want, (spec, s)
        cache.commit(k, k, s)


@pytest.mark.parametrize(
    "kw, name",
    [
        ({"tokens_per_frame": 0}, "tokens_per_frame"),
        ({"tokens_per_frame": -3}, "tokens_per_frame"),
        ({"batch": -1}, "batch"),
        ({"heads": 0}, "heads"),
        ({"max_frames": 0}, "max_frames"),
    ],
)
def test_cache_arguments_are_checked_by_name(kw, name):
    args = dict(batch=1, heads=1, head_dim=2, tokens_per_frame=1, max_frames=4) | kw
    with pytest.raises(ValueError, match=name):
        KVCache(MemoryPolicy(), **args)


def test_a_view_that_could_never_be_committed_raises_like_commit():
    cache = KVCache(MemoryPolicy(), batch=1, heads=1, head_dim=2, tokens_per_frame=1, max_frames=3)
    k = torch.zeros(1, 2, 1, 2)
    cache.commit(k, k, 0)
    with pytest.raises(ValueError, match="full cache overflow"):
        cache.view(k, k, 2)  # frames 2, 3 exceed max_frames=3: its commit would fail too
