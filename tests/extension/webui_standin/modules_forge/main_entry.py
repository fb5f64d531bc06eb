from modules import sd_models, shared


def refresh_model_loading_parameters():
    checkpoint_info = sd_models.select_checkpoint()
    sd_models.model_data.forge_loading_parameters = dict(checkpoint_info=checkpoint_info, additional_modules=[])


def checkpoint_change(ckpt_name, save=True, refresh=True):
    new_info = sd_models.get_closet_checkpoint_match(ckpt_name)
    current_info = sd_models.get_closet_checkpoint_match(shared.opts.data.get("sd_model_checkpoint", ""))
    if new_info == current_info:
        return False
    shared.opts.set("sd_model_checkpoint", ckpt_name)
    if refresh:
        refresh_model_loading_parameters()
    return True
