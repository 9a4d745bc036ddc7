"""Device codecs: encoding right after capture and decoding after a read give bit-identical
results to the host (numpy) codecs, and a store written from device codes reads back the same."""

from __future__ import annotations

import contextlib
import logging

import ml_dtypes
import numpy as np
import pytest
from codec_kit import bits
from conftest import get_model

from vinekv.kvstore import SnapshotStore, capture_sequences, get_codec
from vinekv.kvstore.capture import capture_encoded

CODECS = ["int8", "lossless", {"name": "int4", "group_size": 16}, "int4-hadamard"]
CODEC_IDS = ["int8", "lossless", "int4", "int4-hadamard"]


def _int8_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The int8 spec's formula, written out per element (slow, independent of the codec)."""
    x = x.astype(np.float32)
    scale = np.zeros(x.shape[:-1], np.float16)
    q = np.zeros(x.shape, np.int8)
    for idx in np.ndindex(*x.shape[:-1]):
        s = np.float16(np.float32(np.abs(x[idx]).max()) * np.float32(1 / 127))
        scale[idx] = s
        if s > 0:
            q[idx] = np.clip(np.rint(x[idx] / np.float32(s)), -127, 127)
    return q, scale


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("codec", CODECS, ids=CODEC_IDS)
def test_device_codec_is_bit_identical_to_host(codec, dtype):
    import jax
    import jax.numpy as jnp

    codec = get_codec(codec)
    rng = np.random.default_rng(0)
    length, width = 45, 64  # not a multiple of the int4 group; padding past `length` is garbage
    channel_scale = rng.lognormal(0, 1.5, (1, 1, 1, 32))  # outlier channels, as trained keys have
    keys = (rng.standard_normal((3, width, 2, 32)) * channel_scale).astype(dtype)
    values = rng.standard_normal((3, width, 2, 32)).astype(dtype)
    keys[:, length:], values[:, length:] = 1e4, -1e4
    keys[1, 3], values[2, 7] = 0, 0  # all-zero vectors: scale 0
    host = codec.encode(keys[:, :length], values[:, :length])
    device = codec.trim(jax.device_get(codec.device_encode(jnp.asarray(keys), jnp.asarray(values), length)), length)
    assert host.keys() == device.keys()
    for name in host:
        assert host[name].data.dtype == device[name].data.dtype and host[name].dims == device[name].dims
        np.testing.assert_array_equal(bits(host[name].data), bits(device[name].data), err_msg=name)
    codes = {name: a.data for name, a in host.items()}
    for out in (np.float32, ml_dtypes.bfloat16):
        on_host = codec.decode(codes, np.dtype(dtype).name, out)
        on_device = np.asarray(
            codec.device_decode({n: jnp.asarray(a) for n, a in codes.items()}, np.dtype(dtype).name, out)
        )
        assert on_host.dtype == on_device.dtype == np.dtype(out) and on_host.shape == (3, 2, length, 2, 32)
        np.testing.assert_array_equal(bits(on_host), bits(on_device))
    if codec.name == "int8":  # and both equal the documented formula
        q, scale = _int8_reference(np.stack([keys[:, :length], values[:, :length]], axis=1))
        np.testing.assert_array_equal(codes["q"], q)
        np.testing.assert_array_equal(bits(codes["scale"]), bits(scale))


@pytest.mark.parametrize(
    "codec", ["int8", {"name": "int4", "group_size": 8}, "int4-hadamard"], ids=["int8", "int4", "int4-hadamard"]
)
def test_device_scales_match_host_on_a_million_vectors(codec):
    """Rare last-bit differences (XLA turns a division by a constant into a multiplication by
    its reciprocal) show up only over many values: compare every scale of 2^20 vectors."""
    import jax
    import jax.numpy as jnp

    codec = get_codec(codec)
    rng = np.random.default_rng(1)
    spread = 3 if codec.name == "int8" else 1.5  # int4's parameters are float16: |x| <= 65504
    keys = (rng.standard_normal((1, 2**17, 4, 2)) * rng.lognormal(0, spread, (1, 2**17, 4, 1))).astype(np.float32)
    values = (rng.standard_normal((1, 2**17, 4, 2)) * rng.lognormal(0, spread, (1, 2**17, 4, 1))).astype(np.float32)
    host = codec.encode(keys, values)
    device = codec.trim(jax.device_get(codec.device_encode(jnp.asarray(keys), jnp.asarray(values), 2**17)), 2**17)
    for name in host:
        np.testing.assert_array_equal(bits(host[name].data), bits(device[name].data), err_msg=name)


@pytest.mark.parametrize("codec", CODECS, ids=CODEC_IDS)
def test_capture_encoded_equals_host_encoding_of_the_captured_kv(codec, token_seq, tmp_path):
    model = get_model("llama", kv_dtype="bfloat16")
    codec = get_codec(codec)
    lengths, prompt_lens = [37, 70, 9], [20, 33, 9]  # two chunks of 2 rows; a prompt-only sequence
    seqs = [np.concatenate([token_seq[0], token_seq[1]])[:n] for n in lengths]
    host = list(capture_sequences(model, seqs, batch_rows=2))
    encoded = [s for s, _ in capture_encoded(model, seqs, prompt_lens, codec, batch_rows=2)]
    for state, enc, plen in zip(host, encoded, prompt_lens, strict=True):
        assert enc.position == state.position and enc.prompt_len == plen and enc.fingerprint == state.fingerprint
        np.testing.assert_array_equal(enc.token_ids, state.token_ids)
        for part, (lo, hi) in ((enc.prompt, (0, plen)), (enc.response, (plen, state.position))):
            want = codec.encode(state.keys[:, 0, lo:hi], state.values[:, 0, lo:hi])
            for name in want:
                np.testing.assert_array_equal(bits(part[name].data), bits(want[name].data), err_msg=name)
    # A store written from device codes reads back exactly what one written from host KV does.
    with (
        SnapshotStore.open(tmp_path / "dev", codec=codec) as dev,
        SnapshotStore.open(tmp_path / "host", codec=codec) as ref,
    ):
        for i, (state, enc, plen) in enumerate(zip(host, encoded, prompt_lens, strict=True)):
            dev.spill("r", f"t{i}", enc, plen)
            ref.spill("r", f"t{i}", state, plen)
        dev.flush()
        ref.flush()
        for i, n in enumerate(lengths):
            for t in sorted({1, prompt_lens[i], n}):
                a, b = dev.read_prefix("r", f"t{i}", t), ref.read_prefix("r", f"t{i}", t)
                np.testing.assert_array_equal(bits(a.keys), bits(b.keys))
                np.testing.assert_array_equal(bits(a.values), bits(b.values))
                c = dev.read_prefix("r", f"t{i}", t, on_device=True)  # decoded on the device
                np.testing.assert_array_equal(bits(np.asarray(c.keys)), bits(a.keys))
                np.testing.assert_array_equal(bits(np.asarray(c.values)), bits(a.values))


def test_spilling_codes_of_another_codec_is_refused(tiny_model, token_seq, tmp_path):
    enc, _ = next(capture_encoded(tiny_model, [token_seq[0, :30]], [10], "lossless"))
    with SnapshotStore.open(tmp_path / "s", codec="int8") as store:
        with pytest.raises(ValueError, match="encoded with codec 'lossless', the store uses Int8Codec"):
            store.spill("r", "t", enc, 10)
        with pytest.raises(ValueError, match="prompt_len 12 != the 10"):
            store.spill("r", "t", next(capture_encoded(tiny_model, [token_seq[0, :30]], [10], "int8"))[0], 12)


def test_inject_broadcast_on_device_equals_the_host_build(tiny_model, token_seq, monkeypatch):
    """`cache_from_states` builds the cache on the host on CPU and on the device elsewhere; both
    give the same cache, from host or device snapshots of different lengths (one past a bucket)."""
    import dataclasses

    import jax.numpy as jnp

    from vinekv.kvstore import cache_from_states, capture_state, dense_cache

    ids = np.concatenate([token_seq[0], token_seq[1]])[None]
    states = [capture_state(tiny_model, ids, n) for n in (5, 70)]
    host = cache_from_states(tiny_model, states, max_length=140, repeats=3)
    monkeypatch.setattr(dense_cache, "broadcast_on_device", lambda: True)
    on_device = [dataclasses.replace(s, keys=jnp.asarray(s.keys), values=jnp.asarray(s.values)) for s in states]
    for variant in (states, on_device):
        got = cache_from_states(tiny_model, variant, max_length=140, repeats=3)
        for a, b in zip(host.views, got.views, strict=True):
            np.testing.assert_array_equal(np.asarray(a.key), np.asarray(b.key))
            np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value))
            np.testing.assert_array_equal(np.asarray(a.indexs), np.asarray(b.indexs))
    np.testing.assert_array_equal(np.asarray(host.views[0].indexs), [5, 5, 5, 70, 70, 70])
    np.testing.assert_array_equal(np.asarray(host.views[1].key[3:, :70]), np.repeat(states[1].keys[1], 3, axis=0))
    assert not np.asarray(host.views[1].key[:3, 5:]).any()  # zero past each row's position


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")  # NaN codes
@pytest.mark.parametrize("codec", CODECS, ids=CODEC_IDS)
def test_device_codec_matches_host_on_edge_values(codec):
    """Subnormals (XLA:CPU flushes them), signed zeros and NaN give the same stored bytes."""
    import jax
    import jax.numpy as jnp

    codec = get_codec(codec)
    tiny = np.finfo(np.float32).tiny
    keys = np.full((2, 32, 2, 4), 0.5, np.float32)
    keys[0, :, 0] = [tiny / 4, -tiny / 8, 0.0, -0.0]  # subnormals and signed zeros
    keys[0, :16, 1] = -0.0
    keys[0, 16:, 1] = 0.0
    keys[1, 5, 0, 2] = np.nan
    values = -keys
    host = codec.encode(keys, values)
    device = codec.trim(jax.device_get(codec.device_encode(jnp.asarray(keys), jnp.asarray(values), 32)), 32)
    for name in host:
        np.testing.assert_array_equal(bits(host[name].data), bits(device[name].data), err_msg=name)


@contextlib.contextmanager
def _compiled_programs():
    """Names of the XLA programs compiled in the block (each a jit cache miss: jax logs every
    lowering under ``jax_log_compiles``; a persistent compilation cache hit still counts)."""
    import jax

    names: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith("Compiling "):
                names.append(message.removeprefix("Compiling ").split(" with ")[0])

    logger = logging.getLogger("jax._src.interpreters.pxla")
    handler, propagate = Collect(logging.WARNING), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False  # no screenful of "Compiling ..." warnings
    try:
        with jax.log_compiles(True):
            yield names
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


@pytest.mark.parametrize("codec", CODECS, ids=CODEC_IDS)
def test_spilling_a_new_length_within_a_bucket_compiles_nothing(codec, tiny_model, token_seq, tmp_path):
    """Both spill paths (`capture_sequences` + host encoding, `capture_encoded`) compile per
    64-token bucket, not per trajectory length. Before the fix `extract_state` sliced the device
    cache at the exact length: two programs (a gather and a broadcast) per new length, 80-95 ms
    of a 30-45 ms spill of the tiny model."""
    import jax

    from vinekv.kvstore.dense_cache import EXTRACT_BUCKET, extract_state, forward_chunk

    seq, plen = np.concatenate([token_seq[0], token_seq[1]]), 16  # 80 tokens
    with SnapshotStore.open(tmp_path / "s", codec=codec) as store:

        def spill(n: int) -> None:
            store.spill("host", f"t{n}", next(capture_sequences(tiny_model, [seq[:n]])), plen)
            store.spill("device", f"t{n}", next(capture_encoded(tiny_model, [seq[:n]], [plen], store.codec))[0], plen)

        for n in (40, 39):  # twice: EasyDeL's module gains an attribute in its first call, so its
            spill(n)  # forward compiles again in the second
        with _compiled_programs() as compiled:
            jax.jit(lambda x: x * 3)(np.zeros(11))  # the counter sees a compile
            assert len(compiled) == 1, compiled
            for n in (41, 57, 64):
                spill(n)
        assert len(compiled) == 1, compiled
        store.flush()
        for n in (41, 57, 64):
            np.testing.assert_array_equal(
                bits(store.read_prefix("host", f"t{n}", n).keys), bits(store.read_prefix("device", f"t{n}", n).keys)
            )
    # the bucketed device slice cut on the host is the exact slice, bit for bit
    cache = tiny_model.init_cache(batch_size=1, max_length=2 * EXTRACT_BUCKET)
    _, cache = forward_chunk(tiny_model, cache, seq[None])
    for n in (1, 41, 64, 65, 80):
        state = extract_state(tiny_model, cache, seq[None], n)
        for layer, view in enumerate(cache.views):
            np.testing.assert_array_equal(bits(state.keys[layer]), bits(np.asarray(view.key)[:, :n]))
            np.testing.assert_array_equal(bits(state.values[layer]), bits(np.asarray(view.value)[:, :n]))
