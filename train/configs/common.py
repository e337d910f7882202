"""Defaults shared by every experiment config; each config file overrides what it needs."""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Numerics preset: "default" (float32; float32 matmuls as the backend does them, i.e.
    # TF32 on recent GPUs), "fp32" (float32 matmuls too, for parity checks) or "bf16"
    # (bfloat16 compute with float32 params, optimizer state, EMA and sampler state: the
    # fast path on GPU/TPU). model.dtype, when set, overrides the compute dtype.
    c.precision = "default"
    # Persistent XLA compilation cache (a local or gs:// folder; None = off). A warm cache
    # turns a restarted job's compile into a load. It holds executable code: never point it
    # at a folder other users can write.
    c.compile_cache_dir = ml_collections.FieldReference(None, field_type=str)

    c.data = ml_collections.ConfigDict()
    c.data.name = "digits"
    c.data.data_dir = ml_collections.FieldReference(None, field_type=str)  # prepared TFDS
    # File datasets ("imagefolder", "arrayrecord", "npy"): a local path or gs:// URL.
    c.data.path = ml_collections.FieldReference(None, field_type=str)
    c.data.image_size = ml_collections.FieldReference(None, field_type=int)  # imagefolder
    c.data.skip_corrupt = False  # imagefolder: skip unreadable images instead of failing
    c.data.conditional = True  # imagefolder's config uses None: conditional iff labelled
    c.data.random_flip = False  # left-right flips, seeded by the example's global index
    c.data.augment = ""  # "edm": EDM's non-leaking augmentation (needs model.augment_dim=9)
    c.data.augment_p = 0.12  # probability scale of the "edm" augmentations
    c.data.workers = 0  # input worker processes (decode + augment); 0: in this process
    # Dataset "latents" (shards of python -m jaxdiff.pretrained.encode): "sample" draws a
    # fresh posterior sample mean + std * noise per epoch (DiT/REPA; the noise is keyed by
    # seed and example position, so resuming is exact), "mean" uses the posterior mean.
    # random_flip then picks the stored mirrored-image latents (encode --flip) for half the
    # examples. The VAE scaling (raw - shift) * scale comes from the shards' metadata; set
    # latent_scale / latent_shift (a number or one per channel) to override it.
    c.data.latents = "sample"
    c.data.latent_scale = ml_collections.FieldReference(None, field_type=object)
    c.data.latent_shift = ml_collections.FieldReference(None, field_type=object)

    # Latent runs: a converted VAE file (python -m jaxdiff.pretrained.convert) that decodes
    # samples to images for grids, `python -m sample` and metrics; None shows raw channels.
    c.vae = ml_collections.ConfigDict()
    c.vae.path = ml_collections.FieldReference(None, field_type=str)

    c.model = ml_collections.ConfigDict()
    c.model.name = "unet"
    c.model.dtype = ml_collections.FieldReference(None, field_type=str)  # "bfloat16", ...

    c.formulation = ml_collections.ConfigDict()
    c.formulation.name = "edm"

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 200
    c.optim.decay_steps = ml_collections.FieldReference(None, field_type=int)
    # Learning-rate schedule after the warm-up: "cosine" (to 0 by decay_steps; None = no
    # decay), "constant" (decay_steps None), or "inverse_sqrt", EDM2's
    # lr / sqrt(max(step / decay_steps, 1)) (EDM2: decay_steps = its ref_batches, 70000).
    c.optim.schedule = "cosine"
    c.optim.grad_clip = 1.0
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 1000
    c.train.batch_size = 128
    c.train.label_dropout = 0.1
    c.train.ema_rates = (0.999,)
    c.train.ema_warmup = True
    # Power-function EMA profiles (EDM2) by relative std, kept as "std0.050"-style EMA keys
    # beside ema_rates; EDM2 keeps (0.05, 0.1). Every phema_every steps (0 = never) they are
    # written to WORKDIR/phema/ for post-hoc EMA: python -m jaxdiff.experiment.phema.
    c.train.ema_stds = ()
    c.train.phema_every = 0
    c.train.log_every = 100
    c.train.checkpoint_every = 1000
    c.train.sample_every = 0  # 0: only at the end
    c.train.keep_checkpoints = 3

    c.sample = ml_collections.ConfigDict()
    c.sample.solver = "heun"
    c.sample.steps = 18
    c.sample.sigma_min = 0.002
    c.sample.sigma_max = 80.0
    c.sample.rho = 7.0
    c.sample.guidance = "cfg:2.0"
    c.sample.grid_size = 64
    c.sample.grid_scale = 1

    # In-loop evaluation: every `every` steps (0 = never), sample `num` images with the
    # config.sample settings and the first EMA, evaluate with `name`: one evaluator or
    # several, comma-separated (fd_digits, toy, fid, sfid, is, prec_recall, kid,
    # fd_dinov2). The files are those of python -m sample's flags of the same names
    # ("" = not given; weights default to $JAXDIFF_INCEPTION_WEIGHTS etc.).
    c.eval = ml_collections.ConfigDict()
    c.eval.name = ""
    c.eval.every = 0
    c.eval.num = 1000
    c.eval.batch_size = 500
    c.eval.fid_stats = ""  # FID reference statistics .npz
    c.eval.ref_batch = ""  # ADM-layout reference batch (sfid, prec_recall, kid; fid)
    c.eval.inception_weights = ""
    c.eval.inception_fc = ""  # logits layer, for is
    c.eval.dinov2_stats = ""  # FD-DINOv2 reference statistics
    c.eval.dinov2_weights = ""

    # Smooth Diffusion's step-wise variation regulariser (jaxdiff/training/smooth.py):
    # weight * mean((r - m)^2), r the x0 prediction's variation under a random input
    # variation. weight 0 = off (the paper's script: 1.0). target: "batch" (m = the
    # stop-gradient batch mean of r; the script keeps a running mean) or a fixed number.
    c.smooth = ml_collections.ConfigDict()
    c.smooth.weight = 0.0
    c.smooth.target = "batch"

    # REPA (jaxdiff/experiment/repa.py): weight * mean -cos(projector(h), encoder features)
    # of the clean images; weight 0 = off (REPA: 0.5). layer: UNet "enc{level}"/"mid", DiT
    # blocks before the aligned tokens ("" = enc1 / depth // 3); hidden: the projector's
    # width (REPA: 2048); encoder: "digits_classifier" or converted DINOv2 weights.
    c.repa = ml_collections.ConfigDict()
    c.repa.weight = 0.0
    c.repa.layer = ""
    c.repa.hidden = 2048
    c.repa.encoder = "digits_classifier"

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.num_devices = -1  # -1: all devices
    return c


def add_model_speed_options(c: ml_collections.ConfigDict, dit: bool = False) -> None:
    """The speed options of the UNet and DiT models, so the CLI can set them.

    ``remat``: "none" (fastest, most memory), "dots" (keep matmul outputs, recompute the
    memory-bound ops and attention) or "full" (recompute each block, about +33% FLOPs).
    ``attention_impl``: None picks cuDNN's fused attention on GPU in bf16/fp16 and XLA
    elsewhere; "xla" or "cudnn" force one. DiT's ``scan_blocks`` compiles one block under
    ``nn.scan`` instead of ``depth`` copies (faster compiles for deep models; measure the
    step time before making it your default).
    """
    c.model.remat = "none"
    c.model.attention_impl = ml_collections.FieldReference(None, field_type=str)
    if dit:
        c.model.scan_blocks = False


def add_cep_options(c: ml_collections.ConfigDict) -> None:
    """Condition-embedding perturbation (CEP) fields of the UNet and DiT class embedding.

    ``cep_scale`` is CEP's gamma (0 = off): in training only, the class embedding gets
    ``gamma / sqrt(d)`` times standard Gaussian noise (``cep_noise="gaussian"``) or
    ``U(-gamma / sqrt(d), gamma / sqrt(d))`` noise (``"uniform"``), ``d`` its width.
    """
    c.model.cep_scale = 0.0
    c.model.cep_noise = "gaussian"
