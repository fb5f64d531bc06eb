"""StableDiffusionProcessingTxt2Img (a dataclass: unknown keywords raise TypeError) and process_images with
the host's settings-override logic. "Sampling" draws a 64x64 image whose colours are the loaded weights'
digest, and the infotext names the model as the host does."""
import dataclasses

from PIL import Image

from modules import _flavour, sd_models, shared

need_global_unload = False


@dataclasses.dataclass(repr=False)
class StableDiffusionProcessing:
    sd_model: object = None
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    sampler_name: str = None
    scheduler: str = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    extra_generation_params: dict = None
    override_settings: dict = None
    override_settings_restore_afterwards: bool = True
    styles: list = None

    def __post_init__(self):
        self.extra_generation_params = self.extra_generation_params or {}
        self.override_settings = self.override_settings or {}
        self.styles = self.styles or []
        self.scripts = None
        self.script_args = ()
        self.closed = False

    def close(self):
        self.closed = True


@dataclasses.dataclass(repr=False)
class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    enable_hr: bool = False
    denoising_strength: float = 0.75


if _flavour.FORGE:
    @dataclasses.dataclass(repr=False)
    class StableDiffusionProcessingTxt2Img(StableDiffusionProcessingTxt2Img):
        distilled_cfg_scale: float = 3.5


class Processed:
    def __init__(self, p, images_list, seed=-1, info="", infotexts=None):
        self.images = images_list
        self.seed = seed
        self.info = info
        self.infotexts = infotexts or [info]


def create_infotext(p):
    params = {"Steps": p.steps, "Sampler": p.sampler_name, "CFG scale": p.cfg_scale, "Seed": p.seed,
              "Size": f"{p.width}x{p.height}", "Model hash": p.sd_model_hash, "Model": p.sd_model_name,
              **p.extra_generation_params}
    text = ", ".join(f"{k}: {v}" for k, v in params.items() if v is not None)
    return f"{p.prompt}\nNegative prompt: {p.negative_prompt}\n{text}"


def process_images_inner(p):
    model = shared.sd_model
    if shared.state.interrupted:
        return Processed(p, [], p.seed, "")
    p.sd_model_name = model.sd_checkpoint_info.name_for_extra
    p.sd_model_hash = model.sd_model_hash
    digest = bytes.fromhex(model.digest)
    image = Image.new("RGB", (64, 64), tuple(digest[:3]))
    image.info["weights_digest"] = model.digest
    info = create_infotext(p)
    return Processed(p, [image], p.seed, info, [info])


def _set_config(values):
    """Forge's modules.sysinfo.set_config(..., run_callbacks=False, save_config=False)."""
    from modules_forge import main_entry

    refresh = False
    for k, v in values.items():
        if v == shared.opts.data.get(k):
            continue
        if k == "sd_model_checkpoint":
            if v is not None and v not in sd_models.checkpoint_aliases:
                raise RuntimeError(f"model {v!r} not found")
            refresh = main_entry.checkpoint_change(v, save=False, refresh=False) or refresh
        else:
            shared.opts.set(k, v, is_api=True, run_callbacks=False)
    if refresh:
        main_entry.refresh_model_loading_parameters()


def process_images(p):
    if p.scripts is not None:
        p.scripts.before_process(p)
    stored_opts = {k: shared.opts.data[k] for k in p.override_settings if k in shared.opts.data}
    try:
        if sd_models.checkpoint_aliases.get(p.override_settings.get("sd_model_checkpoint")) is None:
            p.override_settings.pop("sd_model_checkpoint", None)
            if not _flavour.FORGE:
                sd_models.reload_model_weights()
        if _flavour.FORGE:
            _set_config(p.override_settings)
            p.sd_model, _ = sd_models.forge_model_reload()
        else:
            for k, v in p.override_settings.items():
                shared.opts.set(k, v, is_api=True, run_callbacks=False)
                if k == "sd_model_checkpoint":
                    sd_models.reload_model_weights()
        res = process_images_inner(p)
    finally:
        if p.override_settings_restore_afterwards:
            if _flavour.FORGE:
                _set_config(stored_opts)
            else:
                for k, v in stored_opts.items():
                    setattr(shared.opts, k, v)
    return res


def fix_seed(p):
    if p.seed is None or p.seed == -1:
        p.seed = 1234


