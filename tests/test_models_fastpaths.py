"""Tests for the models' fast paths: scanned DiT blocks, remat policies, bf16 compute.

Tiny models; every comparison runs both sides in one jitted function, so the whole file
costs a handful of CPU compiles. Structural checks use ``jax.eval_shape`` /
``jax.make_jaxpr`` (tracing only, no compile).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models import DiT, UNet
from jaxdiff.models.dit import stack_blocks, to_layout, unstack_blocks
from jaxdiff.models.remat import REMAT_POLICIES, checkpoint_policy, maybe_remat, remat_name
from jaxdiff.parallel import make_mesh, param_shardings

X = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 4)), jnp.float32)
XU = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, 3)), jnp.float32)
T = jnp.asarray([0.3, -0.7], jnp.float32)
Y = jnp.asarray([1, 4], jnp.int32)
DIT = dict(patch_size=2, hidden_size=32, depth=3, num_heads=2, num_classes=10)
# One resolution level (ResBlocks, attention at 8 px and in the middle) keeps the U-Net
# gradient programs quick to compile on CPU.
UNET = dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,), num_classes=10)
UNET = dict(UNET, dropout=0.0)
# bf16 compute vs the fp32 output: measured relative L2 errors 0.35%-0.9% (DiT and U-Net,
# four param seeds each); 3e-2 leaves >3x margin. The lower bound proves bf16 really ran.
BF16_MAX_REL, BF16_MIN_REL = 3e-2, 1e-4


def random_params(model, x, seed=0, scale=0.1):
    """Non-zero float32 numpy params without compiling the random initialisers."""
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x, T, Y))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (rng.standard_normal(s.shape) * scale).astype(s.dtype), shapes)


def assert_trees_close(a, b, rtol=1e-6, atol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), a, b)


def count(jaxpr, primitive):
    """Occurrences of a primitive in a jaxpr, descending into sub-jaxprs (scan bodies once)."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == primitive
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    n += count(inner, primitive)
    return n


def scan_bodies(jaxpr):
    """Body jaxprs of the ``scan`` equations anywhere in ``jaxpr``."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            out.append(eqn.params["jaxpr"].jaxpr)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out += scan_bodies(inner)
    return out


@pytest.fixture(scope="session")
def unrolled():
    return random_params(DiT(**DIT), X)


def test_layout_conversion_round_trips_and_matches_scanned_init(unrolled):
    scanned = stack_blocks(unrolled, 3)
    assert "blocks" in scanned["params"] and "block_0" not in scanned["params"]
    back = unstack_blocks(scanned)
    assert jax.tree.structure(back) == jax.tree.structure(unrolled)
    jax.tree.map(np.testing.assert_array_equal, back, unrolled)  # exact
    assert isinstance(scanned["params"]["blocks"]["fc1"]["kernel"], np.ndarray)  # stays host
    # to_layout converts only when needed, so it is idempotent.
    assert to_layout(scanned, scanned=True) is scanned
    assert to_layout(unrolled, scanned=False) is unrolled
    jax.tree.map(np.testing.assert_array_equal, to_layout(unrolled, True), scanned)
    jax.tree.map(np.testing.assert_array_equal, to_layout(to_layout(scanned, False), True), scanned)
    # A bare params dict (no "params" wrapper) and jax arrays work too.
    bare = stack_blocks(jax.tree.map(jnp.asarray, unrolled["params"]))
    assert isinstance(bare["blocks"]["fc1"]["kernel"], jax.Array)

    # The converted tree is exactly what a scan_blocks=True DiT creates, with the same
    # parameter count, and its block params carry the logical axis "layers" first.
    boxed = jax.eval_shape(DiT(**DIT, scan_blocks=True).init, jax.random.key(0), X, T, Y)
    shapes = jax.tree.map(lambda s: (s.shape, s.dtype), nn.unbox(boxed))
    assert shapes == jax.tree.map(lambda a: (a.shape, a.dtype), scanned)
    size = lambda tree: sum(int(np.size(leaf)) for leaf in jax.tree.leaves(tree))  # noqa: E731
    assert size(nn.unbox(boxed)) == size(unrolled)
    specs = nn.get_partition_spec(boxed)["params"]
    block_specs = jax.tree.leaves(
        specs["blocks"], is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)
    )
    assert block_specs and all(spec[0] == "layers" for spec in block_specs)
    assert "layers" not in tuple(specs["patch_embed"]["kernel"])
    # The default rules keep the layer axis whole (each device holds every layer's slice).
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    fc1 = param_shardings(boxed, mesh)["params"]["blocks"]["fc1"]["kernel"]
    assert fc1.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def test_layout_conversion_rejects_wrong_trees(unrolled):
    scanned = stack_blocks(unrolled)
    with pytest.raises(ValueError, match="already hold 'blocks'"):
        stack_blocks(scanned)
    with pytest.raises(ValueError, match="block_0..block_3"):
        stack_blocks(unrolled, depth=4)
    with pytest.raises(ValueError, match="no 'blocks'"):
        unstack_blocks(unrolled)
    with pytest.raises(ValueError, match="neither"):
        to_layout({"params": {"dense": {"kernel": np.zeros(2)}}}, scanned=True)
    gappy = {k: v for k, v in unrolled["params"].items() if k != "block_1"}
    with pytest.raises(ValueError, match="block_0.*block_2"):
        stack_blocks(gappy)
    with pytest.raises(ValueError, match="nn.unbox"):
        stack_blocks(jax.eval_shape(DiT(**DIT).init, jax.random.key(0), X, T, Y))


def test_scanned_and_remat_match_unrolled(unrolled):
    # Outputs for every guidance variant in both layouts, and gradients for both layouts
    # and every remat policy (including remat of the scanned block): one compile. The
    # unrolled "full" path (remat=True) is also covered by test_models_dit.py.
    kw = dict(DIT, pag_layers=(0, 2), skip_layers=(1,))
    plain, scanned = DiT(**kw), DiT(**kw, scan_blocks=True)
    grad_cases = [("none", False), ("none", True), ("dots", False), ("full", True)]

    def run(p, ps):
        outs = [
            (plain.apply(p, X, T, Y, variant=v), scanned.apply(ps, X, T, Y, variant=v))
            for v in (None, "pag", "slg")
        ]
        loss = lambda m, q: jnp.mean(m.apply(q, X, T, Y) ** 2)  # noqa: E731
        grads = [
            jax.grad(loss, 1)(DiT(**kw, remat=r, scan_blocks=s), ps if s else p)
            for r, s in grad_cases
        ]
        return outs, grads

    outs, grads = jax.jit(run)(unrolled, stack_blocks(unrolled))
    for a, b in outs:
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
    # The variants really change the output, so their equality above means something.
    assert float(jnp.max(jnp.abs(outs[1][0] - outs[0][0]))) > 1e-3
    assert float(jnp.max(jnp.abs(outs[2][0] - outs[0][0]))) > 1e-3
    for (_, scan), grad in zip(grad_cases[1:], grads[1:], strict=True):
        assert_trees_close(unstack_blocks(grad) if scan else grad, grads[0])


def test_scan_body_work_and_activation_sharding(unrolled):
    # Variant None: the scan body does exactly one unrolled block's matmuls (no extra
    # work); the PAG body runs both attention paths. Tracing only.
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    kw = dict(DIT, activation_sharding=sharding)
    scanned = stack_blocks(unrolled)

    def trace(model, params, variant):
        fn = lambda p: model.apply(p, X, T, Y, variant=variant)  # noqa: E731
        return jax.make_jaxpr(fn)(params).jaxpr

    plain_jaxpr = trace(DiT(**kw), unrolled, None)
    none_jaxpr = trace(DiT(**kw, scan_blocks=True), scanned, None)
    pag_jaxpr = trace(DiT(**kw, scan_blocks=True), scanned, "pag")
    (body,) = scan_bodies(none_jaxpr)
    (pag_body,) = scan_bodies(pag_jaxpr)
    per_block = count(body, "dot_general")
    outside = count(none_jaxpr, "dot_general") - per_block
    assert count(plain_jaxpr, "dot_general") == outside + DIT["depth"] * per_block
    assert count(pag_body, "dot_general") > per_block
    assert count(body, "sharding_constraint") == 1  # between blocks, inside the body
    assert count(plain_jaxpr, "sharding_constraint") == DIT["depth"]


def test_remat_policy_names():
    assert REMAT_POLICIES == ("none", "dots", "full")
    assert [remat_name(v) for v in (False, True, "dots")] == ["none", "full", "dots"]
    assert checkpoint_policy("dots") is jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    assert checkpoint_policy(True) is None
    assert maybe_remat(DiT, "none") is DiT and maybe_remat(DiT, False) is DiT
    assert maybe_remat(DiT, "full") is not DiT
    with pytest.raises(ValueError, match="'bogus'.*allowed"):
        remat_name("bogus")
    for model, x in ((DiT(**DIT, remat="bogus"), X), (UNet(**UNET, remat="bogus"), XU)):
        with pytest.raises(ValueError, match="'bogus'"):
            jax.eval_shape(model.init, jax.random.key(0), x, T, Y)
    with pytest.raises(ValueError, match="'bogus'"):
        jax.eval_shape(DiT(**DIT, remat="bogus", scan_blocks=True).init, jax.random.key(0), X, T)


def test_unet_remat_policies_give_identical_gradients():
    # The PAG variant sends both values of the static identity flag through remat
    # (identity attention in the middle block, normal attention at 8 px).
    params = random_params(UNet(**UNET), XU)

    def grads(p):
        loss = lambda m, q: jnp.mean(m.apply(q, XU, T, Y, variant="pag") ** 2)  # noqa: E731
        return [jax.grad(loss, 1)(UNet(**UNET, remat=r), p) for r in REMAT_POLICIES]

    g = jax.jit(grads)(params)
    for grad in g[1:]:
        assert_trees_close(grad, g[0])
    assert float(jnp.max(jnp.abs(g[0]["params"]["mid_attn"]["attn"]["qkv"]["kernel"]))) > 0


def test_bf16_compute_with_fp32_params(unrolled):
    unet_params = random_params(UNet(**UNET), XU)

    def run(p, pu):
        return [
            (DiT(**DIT).apply(p, X, T, Y), DiT(**DIT, dtype=jnp.bfloat16).apply(p, X, T, Y)),
            (
                UNet(**UNET).apply(pu, XU, T, Y),
                UNet(**UNET, dtype=jnp.bfloat16).apply(pu, XU, T, Y),
            ),
        ]

    for model, x in ((DiT(**DIT, dtype=jnp.bfloat16), X), (UNet(**UNET, dtype=jnp.bfloat16), XU)):
        shapes = jax.eval_shape(model.init, jax.random.key(0), x, T, Y)
        assert {leaf.dtype for leaf in jax.tree.leaves(nn.unbox(shapes))} == {np.dtype(np.float32)}
    for ref, low in jax.jit(run)(unrolled, unet_params):
        assert low.dtype == jnp.float32 and low.shape == ref.shape
        rel = float(jnp.linalg.norm(low - ref) / jnp.linalg.norm(ref))
        assert BF16_MIN_REL < rel < BF16_MAX_REL, rel
