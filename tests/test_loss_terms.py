"""Extra loss terms in the train step: exact composition with the denoising loss."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.diffusion import EDM
from jaxdiff.diffusion.formulation import expand_to
from jaxdiff.models import UNet
from jaxdiff.training import LossInputs, make_loss_fn

SMALL = dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_classes=10, dropout=0.0)
X = jnp.asarray(np.random.default_rng(0).standard_normal((4, 8, 8, 1)), jnp.float32)
Y = jnp.arange(4, dtype=jnp.int32)


@dataclasses.dataclass(frozen=True)
class MidEnergy:
    """weight * mean(mid^2) of the denoising pass's own UNet activation."""

    weight: float = 0.5
    name: str = "mid"
    captures: bool = True

    def __call__(self, inputs: LossInputs):
        (mid,) = inputs.intermediates["mid"]
        energy = jnp.mean(mid.astype(jnp.float32) ** 2)
        return self.weight * energy, {"energy": energy}


@dataclasses.dataclass(frozen=True)
class SeesNothing:
    name: str = "blind"
    captures: bool = False

    def __call__(self, inputs: LossInputs):
        assert inputs.intermediates == {}
        return jnp.zeros(()), {}


@pytest.fixture(scope="session")
def params():
    model = UNet(**SMALL)
    return nn.unbox(model.init(jax.random.key(1), X, jnp.zeros(4), Y))["params"]


def test_terms_add_to_the_denoising_loss_from_the_same_pass(params):
    model, edm, key = UNet(**SMALL), EDM(sigma_data=0.5), jax.random.key(3)
    batch = {"image": X, "label": Y}
    plain = make_loss_fn(model, edm, num_classes=10, label_dropout=0.0)
    with_terms = make_loss_fn(
        model, edm, num_classes=10, label_dropout=0.0, terms=(MidEnergy(), SeesNothing())
    )
    base, aux0 = plain(params, batch, key)
    total, aux = with_terms(params, batch, key)
    assert aux0 == {}
    # The reference activation: the same noise draw as formulation.loss, recomputed apart.
    _, k_loss, _ = jax.random.split(key, 3)
    k_sigma, k_noise = jax.random.split(k_loss)
    sigma = edm.sample_sigma(k_sigma, (4,))
    noisy = X + expand_to(sigma, X) * jax.random.normal(k_noise, X.shape)
    c = edm.precondition(sigma)
    _, state = model.apply(
        {"params": params}, expand_to(c.c_in, X) * noisy, c.c_noise, Y, mutable=["intermediates"]
    )
    energy = jnp.mean(state["intermediates"]["mid"][0] ** 2)
    np.testing.assert_allclose(aux["denoise_loss"], base, rtol=1e-6)
    np.testing.assert_allclose(aux["mid/energy"], energy, rtol=1e-5)
    np.testing.assert_allclose(aux["mid/loss"], 0.5 * energy, rtol=1e-5)
    np.testing.assert_allclose(total, base + 0.5 * energy, rtol=1e-5)
    assert aux["blind/loss"] == 0.0


def test_term_names_must_be_distinct():
    with pytest.raises(ValueError, match="distinct names.*'mid', 'mid'"):
        terms = (MidEnergy(), MidEnergy())
        make_loss_fn(UNet(**SMALL), EDM(), num_classes=10, label_dropout=0.0, terms=terms)
