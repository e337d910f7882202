"""The pure diffusion train step and its sharded, jitted form."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxdiff.data.augment import AUGMENT_LABEL
from jaxdiff.diffusion.formulation import Formulation, NetFn
from jaxdiff.parallel import batch_sharding, replicated
from jaxdiff.training.state import TrainState, param_projection, update_ema

Batch = dict[str, jax.Array]
StepFn = Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict[str, jax.Array]]]


def drop_labels(key: jax.Array, labels: jax.Array, null_class: int, rate: float) -> jax.Array:
    """Replaces each label by the null class with probability ``rate`` (CFG training)."""
    if rate <= 0:
        return labels
    drop = jax.random.bernoulli(key, rate, labels.shape)
    return jnp.where(drop, null_class, labels)


class LossInputs(NamedTuple):
    """What an extra loss term sees of one train step.

    Attributes:
        params: the model parameters being differentiated.
        batch: the step's batch (``"image"``, ``"label"``, ...).
        labels: the labels after label dropout (None for an unconditional model).
        net: the training-mode network, ``net(x_in, noise_label, cond, **kwargs) -> F``
            (dropout on, the step's dropout key), for terms that need their own pass.
        formulation: the run's formulation (``formulation.as_denoiser(net)`` is ``D``).
        intermediates: what the denoising loss's own forward pass sowed into the
            ``"intermediates"`` collection (e.g. UNet's ``"mid"``), when the term asks for
            it with ``captures = True``; otherwise empty.
        key: the term's own PRNG key (independent of the denoising loss's draws).
        frozen: the term's frozen arrays (its ``frozen`` attribute, e.g. an encoder's
            params), passed into the step as an argument; None for a term without any.
    """

    params: Any
    batch: Batch
    labels: jax.Array | None
    net: NetFn
    formulation: Formulation
    intermediates: dict
    key: jax.Array
    frozen: Any = None


class LossTerm(Protocol):
    """An extra training loss added to the denoising loss (REPA, a regulariser, ...).

    A term is a pure function of :class:`LossInputs`; it returns its contribution to the
    scalar loss, already weighted, and a dict of scalar metrics (reported as
    ``"<name>/<metric>"``). ``captures = True`` asks for the denoising pass's
    ``"intermediates"``, so a term on hidden activations (REPA) costs no extra forward.

    A term may also have a ``frozen`` attribute: a pytree of arrays it reads but does not
    train (a frozen encoder's params). The step takes them as an argument (see
    :func:`make_train_step`) and hands them back as :attr:`LossInputs.frozen`: an array a
    term closed over would be baked into the compiled program as a constant.
    """

    name: str
    captures: bool

    def __call__(self, inputs: LossInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Returns ``(weighted scalar loss, scalar metrics)``."""
        ...


def make_loss_fn(
    model: nn.Module,
    formulation: Formulation,
    *,
    num_classes: int,
    label_dropout: float,
    terms: Sequence[LossTerm] = (),
) -> Callable[[Any, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]:
    """Returns ``loss_fn(params, batch, key) -> (loss, aux)`` for denoising training.

    A batch with an ``"augment_label"`` entry (augmented images, see
    :class:`jaxdiff.data.augment.EdmAugment`) has it passed to every network call as
    ``augment_label=``; the model must then have ``augment_dim > 0``.

    Args:
        model: a jaxdiff model (``__call__(x, noise_label, cond, *, train)``).
        formulation: how the network is preconditioned and its loss weighted.
        num_classes: number of classes (0 = unconditional); label id ``num_classes`` is null.
        label_dropout: probability of training a label as the null class.
        terms: extra loss terms added to the mean denoising loss (see :class:`LossTerm`);
            with none, the loss is exactly the denoising loss and ``aux`` is empty.
    """
    terms = tuple(terms)
    names = [t.name for t in terms]
    if len(set(names)) != len(names):
        raise ValueError(f"loss terms need distinct names, got {names}")
    captures = any(t.captures for t in terms)
    own_frozen = frozen_of(terms)

    def loss_fn(params, batch, key, frozen=None):
        # frozen: one entry per term (None = the terms' own arrays, closed over).
        frozen = own_frozen if frozen is None else tuple(frozen)
        k_drop, k_loss, k_net = jax.random.split(key, 3)
        labels = None
        if num_classes > 0:
            labels = drop_labels(k_drop, batch["label"], num_classes, label_dropout)
        # The labels ride in the network closure rather than through the formulation: they
        # describe x0 (not the noise level), and D(x, sigma) needs no change to carry them.
        extra = {}
        if AUGMENT_LABEL in batch:
            if getattr(model, "augment_dim", 0) <= 0:
                raise ValueError(
                    f"the batch has {AUGMENT_LABEL!r} {batch[AUGMENT_LABEL].shape} but "
                    f"{type(model).__name__} takes no augmentation labels: set the model's "
                    "augment_dim to their width, or train without the augmentation"
                )
            extra[AUGMENT_LABEL] = batch[AUGMENT_LABEL]

        def net(x_in, noise_label, cond, **kwargs):
            return model.apply(
                {"params": params},
                x_in,
                noise_label,
                cond,
                train=True,
                rngs={"dropout": k_net},
                **extra,
                **kwargs,
            )

        sown: list[dict] = []

        def capturing_net(x_in, noise_label, cond):
            # The denoising loss calls the network once; what that call sows is handed to
            # the terms (a trace-time side channel inside this one function, so it is pure).
            out, state = net(x_in, noise_label, cond, mutable=["intermediates"])
            sown.append(state.get("intermediates", {}))
            return out

        main_net = capturing_net if captures else net
        per_example = formulation.loss(main_net, batch["image"], k_loss, labels)
        loss = jnp.mean(per_example)
        if not terms:
            return loss, {}
        if captures and len(sown) != 1:
            raise ValueError(
                f"{type(formulation).__name__}.loss called the network {len(sown)} times; "
                "terms that read intermediates need exactly one denoising pass"
            )
        aux = {"denoise_loss": loss}
        term_keys = jax.random.split(jax.random.fold_in(key, 0x7E4D), len(terms))
        for term, k, term_frozen in zip(terms, term_keys, frozen, strict=True):
            inputs = LossInputs(
                params=params,
                batch=batch,
                labels=labels,
                net=net,
                formulation=formulation,
                intermediates=sown[0] if (term.captures and sown) else {},
                key=k,
                frozen=term_frozen,
            )
            value, metrics = term(inputs)
            loss = loss + value
            aux[f"{term.name}/loss"] = value
            aux.update({f"{term.name}/{m}": v for m, v in metrics.items()})
        return loss, aux

    return loss_fn


def make_train_step(
    model: nn.Module,
    formulation: Formulation,
    tx: optax.GradientTransformation,
    *,
    num_classes: int = 0,
    label_dropout: float = 0.0,
    ema_warmup: bool = True,
    terms: Sequence[LossTerm] = (),
) -> StepFn:
    """Returns the pure ``train_step(state, batch, key) -> (state, metrics)``.

    ``key`` is the run's base key: the step folds in ``state.step``, so a resumed run draws
    exactly the noise an uninterrupted run would have.

    With terms that hold ``frozen`` arrays, the step also takes them as an optional fourth
    argument ``frozen`` (one entry per term; None = the terms' own, closed over) and
    carries them as ``train_step.frozen``: :func:`jit_train_step` passes them in as a
    replicated argument, so they are never compiled into the program.

    Args:
        model: the network.
        formulation: the diffusion formulation.
        tx: the optimizer.
        num_classes: number of classes (0 = unconditional).
        label_dropout: probability of dropping a label to the null class.
        ema_warmup: use the ``(1+t)/(10+t)`` EMA warm-up.
        terms: extra loss terms (see :func:`make_loss_fn`); their values and metrics join
            the step's metrics, and ``"loss"`` is the total.
    """
    loss_fn = make_loss_fn(
        model, formulation, num_classes=num_classes, label_dropout=label_dropout, terms=terms
    )
    project = param_projection(model)  # e.g. EDM2's forced weight normalisation

    def train_step(state: TrainState, batch: Batch, key: jax.Array, frozen: Any = None):
        step_key = jax.random.fold_in(key, state.step)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, batch, step_key, frozen
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = project(optax.apply_updates(state.params, updates))
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            ema=update_ema(state.ema, params, state.step, ema_warmup),
            opt_state=opt_state,
        )
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        return new_state, metrics

    frozen = frozen_of(terms)
    train_step.frozen = frozen if any(f is not None for f in frozen) else None
    return train_step


def frozen_of(terms: Sequence[LossTerm]) -> tuple:
    """Each term's ``frozen`` arrays (None for a term without any)."""
    return tuple(getattr(t, "frozen", None) for t in terms)


class FrozenArgStep:
    """A jitted step whose last argument, the terms' frozen arrays, is bound.

    Called and lowered like the plain jitted step, ``step(state, batch, key)`` and
    ``step.lower(state, batch, key)``; the frozen arrays (already replicated on the
    mesh) go in as the jitted function's fourth argument, so the program holds no copy.

    Attributes:
        jitted: the ``jax.jit`` of ``step(state, batch, key, frozen)``.
        frozen: the device-resident frozen arrays.
    """

    def __init__(self, jitted: Any, frozen: Any):
        self.jitted = jitted
        self.frozen = frozen

    def __call__(self, state: TrainState, batch: Batch, key: jax.Array):
        """Runs one step."""
        return self.jitted(state, batch, key, self.frozen)

    def lower(self, state: Any, batch: Any, key: Any):
        """``jax.jit(...).lower`` with the frozen arrays bound."""
        return self.jitted.lower(state, batch, key, self.frozen)


def jit_train_step(step_fn: StepFn, state_shardings: Any, mesh: Mesh) -> StepFn:
    """Jits a step with explicit shardings and the state donated (updated in place).

    A step carrying frozen arrays (``step_fn.frozen``, see :func:`make_train_step`) gets
    them as a replicated argument: the result is a :class:`FrozenArgStep`, called and
    lowered with ``(state, batch, key)`` like a plain jitted step.
    """
    rep = replicated(mesh)
    frozen = getattr(step_fn, "frozen", None)
    in_shardings = (state_shardings, batch_sharding(mesh), rep)
    if frozen is not None:
        in_shardings = in_shardings + (rep,)
    jitted = jax.jit(
        step_fn,
        in_shardings=in_shardings,
        out_shardings=(state_shardings, rep),
        donate_argnums=(0,),
    )
    if frozen is None:
        return jitted
    return FrozenArgStep(jitted, jax.device_put(frozen, rep))
