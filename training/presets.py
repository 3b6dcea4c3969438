"""The configurations that train.py's --arch, --precond and --preset name:
EDM's architectures and preconditionings (Karras et al. 2022) and EDM2's
network and published training configurations (Karras et al. 2024), with the
option defaults each family implies."""

#----------------------------------------------------------------------------

ARCH_PRESETS = dict( # --arch -> network keywords.
    ddpmpp  = dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
                   channel_mult_noise=1, resample_filter=[1,1], model_channels=128, channel_mult=[2,2,2]),
    ncsnpp  = dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
                   channel_mult_noise=2, resample_filter=[1,3,3,1], model_channels=128, channel_mult=[2,2,2]),
    adm     = dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1,2,3,4]),
    edm2    = dict(model_channels=192, channel_mult=[1,2,3,4]),
)

AUGMENT_PRESET = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1) # Probability multipliers of --augment.

PRECOND_CLASSES = dict( # --precond -> (network class, loss class); EDM2's network has its own.
    vp      = ('training.networks.VPPrecond', 'training.loss.VPLoss'),
    ve      = ('training.networks.VEPrecond', 'training.loss.VELoss'),
    edm     = ('training.networks.EDMPrecond', 'training.loss.EDMLoss'),
    edm2    = ('training.networks_edm2.Precond', 'training.loss.EDM2Loss'),
)

EDM2_PRESETS = { # --preset -> option values of EDM2's published configurations, all with --batch=2048.
    f'edm2-img{res}-{size}': dict(cbase=cbase, lr=lr, decay=decay, dropout=dropout, P_mean=P_mean, P_std=P_std)
    for res, decay, P_mean, P_std, sizes in [
        (64,  35000, -0.8, 1.6, dict(xs=(128, 0.0120, 0), s=(192, 0.0100, 0), m=(256, 0.0090, 0.1), l=(320, 0.0080, 0.1), xl=(384, 0.0070, 0.1))),
        (512, 70000, -0.4, 1.0, dict(xxs=(64, 0.0170, 0), xs=(128, 0.0120, 0), s=(192, 0.0100, 0), m=(256, 0.0090, 0.1), l=(320, 0.0080, 0.1),
            xl=(384, 0.0070, 0.1), xxl=(448, 0.0065, 0.1))),
    ] for size, (cbase, lr, dropout) in sizes.items()
}

FAMILY_DEFAULTS = dict( # Option values that depend on the family of --arch, where not given.
    edm     = dict(precond='edm', ema=0.5, dropout=0.13, augment=0.12, decay=0, phema=None),
    edm2    = dict(precond='edm2', ema=None, dropout=0, augment=0, decay=70000, phema=[0.050, 0.100], P_mean=-0.4, P_std=1.0),
)

STUDENT_DEFAULTS = dict( # Where not given, for a student built from its teacher (README, "Teacher and student"); dropout is the teacher's.
    edm     = dict(augment=0),
    edm2    = dict(augment=0, decay=0),
)

ARCH_OPTIONS = ('arch', 'precond', 'preset', 'cbase', 'cres') # Options that describe the network; none given = the student is the teacher's architecture.

def student_defaults(student):
    """Option values for a student built from its teacher's description (class_name and constructor keywords):
    the family of its class, the defaults of STUDENT_DEFAULTS and the teacher's dropout (None = its class default)."""
    precond = next((name for name, (network_class, _loss) in PRECOND_CLASSES.items() if network_class == student['class_name']), 'edm')
    family = 'edm2' if precond == 'edm2' else 'edm'
    return dict(FAMILY_DEFAULTS[family], **STUDENT_DEFAULTS[family], precond=precond, dropout=student.get('dropout'), **({'arch': 'edm2'} if family == 'edm2' else {}))

#----------------------------------------------------------------------------
