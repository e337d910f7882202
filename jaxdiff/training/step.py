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
    """

    params: Any
    batch: Batch
    labels: jax.Array | None
    net: NetFn
    formulation: Formulation
    intermediates: dict
    key: jax.Array


class LossTerm(Protocol):
    """An extra training loss added to the denoising loss (REPA, a regulariser, ...).

    A term is a pure function of :class:`LossInputs`; it returns its contribution to the
    scalar loss, already weighted, and a dict of scalar metrics (reported as
    ``"<name>/<metric>"``). ``captures = True`` asks for the denoising pass's
    ``"intermediates"``, so a term on hidden activations (REPA) costs no extra forward.
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

    def loss_fn(params, batch, key):
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
        for term, k in zip(terms, term_keys, strict=True):
            inputs = LossInputs(
                params=params,
                batch=batch,
                labels=labels,
                net=net,
                formulation=formulation,
                intermediates=sown[0] if (term.captures and sown) else {},
                key=k,
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

    def train_step(state: TrainState, batch: Batch, key: jax.Array):
        step_key = jax.random.fold_in(key, state.step)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, batch, step_key
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

    return train_step


def jit_train_step(step_fn: StepFn, state_shardings: Any, mesh: Mesh) -> StepFn:
    """Jits a step with explicit shardings and the state donated (updated in place)."""
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_sharding(mesh), replicated(mesh)),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=(0,),
    )
