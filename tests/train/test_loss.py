"""Chunked cross-entropy == plain cross-entropy (values and gradients); its temporaries are
bounded by chunk x vocab, never tokens x vocab."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from covenant_jax.config import ModelConfig
from covenant_jax.model.llama import Llama, ModelOptions
from covenant_jax.train.loss import cross_entropy_sum, plain_cross_entropy_sum, token_nll
from tests import helpers


def _inputs(b=2, t=13, d=16, v=50, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(b, t, d)), dtype)
    kernel = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), dtype)
    targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    mask = jnp.asarray(rng.random((b, t)) > 0.3).at[0, :4].set(False)
    return hidden, kernel, targets, mask


def _plain(hidden, kernel, targets, mask):
    logits = jnp.einsum("BTD,DV->BTV", hidden, kernel, preferred_element_type=jnp.float32)
    return plain_cross_entropy_sum(logits, targets, mask)


@pytest.mark.parametrize("chunk_size,jit", [(7, True), (4096, False)], ids=["chunk7_jit", "clipped_nojit"])
def test_matches_plain_values_and_grads(chunk_size, jit):
    """B*T = 26 is not a multiple of 7: the padded tail must count for nothing."""
    hidden, kernel, targets, mask = _inputs()

    def chunked(h, k):
        return cross_entropy_sum(h, k, targets, mask, chunk_size=chunk_size)

    def plain(h, k):
        return _plain(h, k, targets, mask)

    wrap = jax.jit if jit else (lambda f: f)
    (loss, count), (ref_loss, ref_count) = wrap(chunked)(hidden, kernel), plain(hidden, kernel)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    assert count == ref_count == float(np.sum(np.asarray(mask)))
    grads = wrap(jax.grad(lambda h, k: chunked(h, k)[0], argnums=(0, 1)))(hidden, kernel)
    ref_grads = jax.grad(lambda h, k: plain(h, k)[0], argnums=(0, 1))(hidden, kernel)
    for name, got, want in zip(("hidden", "kernel"), grads, ref_grads):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=name)
    assert not np.any(np.asarray(grads[0])[0, :4]), "masked tokens must get no gradient"


def test_token_nll_any_cotangent_matches_plain():
    """Per-token NLL with a different weight on every token (what a per-sequence preference
    loss sends back): values and the VJP equal the materialised-logits reference."""
    hidden, kernel, targets, _ = _inputs()
    weights = jnp.asarray(np.random.default_rng(1).normal(size=targets.shape), jnp.float32)

    def plain_nll(h, k):
        logits = jnp.einsum("BTD,DV->BTV", h, k, preferred_element_type=jnp.float32)
        picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return jax.nn.logsumexp(logits, axis=-1) - picked

    chunked = jax.jit(lambda h, k: token_nll(h, k, targets, chunk_size=5))
    np.testing.assert_allclose(chunked(hidden, kernel), plain_nll(hidden, kernel), rtol=1e-6, atol=1e-6)
    grads = jax.grad(lambda h, k: jnp.sum(weights * chunked(h, k)), argnums=(0, 1))(hidden, kernel)
    ref = jax.grad(lambda h, k: jnp.sum(weights * plain_nll(h, k)), argnums=(0, 1))(hidden, kernel)
    for got, want in zip(grads, ref):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_bfloat16_inputs_accumulate_in_float32():
    hidden, kernel, targets, mask = _inputs(dtype=jnp.bfloat16)
    loss, _ = jax.jit(lambda h, k: cross_entropy_sum(h, k, targets, mask, chunk_size=8))(hidden, kernel)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, _plain(hidden, kernel, targets, mask)[0], rtol=1e-5)
    grads = jax.grad(lambda h, k: cross_entropy_sum(h, k, targets, mask, chunk_size=8)[0], argnums=(0, 1))(
        hidden, kernel
    )
    assert grads[0].dtype == grads[1].dtype == jnp.bfloat16


def test_llama_hidden_states_and_kernel_give_the_model_loss():
    cfg = ModelConfig.from_hf_dict({**helpers.TINY, "model_type": "llama"})
    model = Llama(cfg, ModelOptions(), rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 11)))
    targets, mask = jnp.roll(tokens, -1, axis=1), jnp.ones(tokens.shape).at[:, -1].set(0)
    hidden = nnx.jit(lambda m, t: m.hidden_states(t))(model, tokens)
    chunked = cross_entropy_sum(hidden, model.output_kernel(), targets, mask, chunk_size=5)
    plain = plain_cross_entropy_sum(model.logits(hidden), targets, mask)
    np.testing.assert_allclose(chunked, plain, rtol=1e-6)


def test_compiled_temp_memory_is_bounded_by_chunk():
    """1024 tokens x 32768 vocab: plain holds 128 MiB float32 logits; chunks of 128 hold 16 MiB."""
    m, d, v, chunk = 1024, 64, 32768, 128
    args = (
        jax.ShapeDtypeStruct((1, m, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((1, m), jnp.int32),
        jax.ShapeDtypeStruct((1, m), jnp.float32),
    )

    def temp(f):
        return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes

    def chunked(h, k, t, mask):
        return cross_entropy_sum(h, k, t, mask, chunk_size=chunk)[0]

    def plain(h, k, t, mask):
        return _plain(h, k, t, mask)[0]

    logits_bytes, chunk_bytes, kernel_bytes = m * v * 4, chunk * v * 4, d * v * 4
    assert temp(plain) >= logits_bytes
    assert temp(chunked) <= 1.25 * chunk_bytes
    # backward: one chunk's logits/probabilities plus the float32 kernel-gradient accumulator
    assert temp(jax.grad(chunked, argnums=(0, 1))) <= 1.25 * chunk_bytes + kernel_bytes
    assert temp(jax.grad(plain, argnums=(0, 1))) >= logits_bytes
