"""Checkpoint registry and model loading with A1111 1.10's contract (or Forge's, see _flavour)."""
import collections
import hashlib
import os
import sys

from safetensors.torch import load_file

from modules import _flavour, paths, script_callbacks, shared

model_dir = "Stable-diffusion"
model_path = os.path.abspath(os.path.join(paths.models_path, model_dir))

checkpoints_list = {}
checkpoint_aliases = {}
checkpoints_loaded = collections.OrderedDict()
events = []  # what happened, for the tests: ("load_file", filename), ("load_state_dict", title), ...


def _sha256(filename):
    # A1111 hashes the file (hashes.sha256); a missing file raises
    h = hashlib.sha256()
    with open(filename, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        abspath = os.path.abspath(filename)
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
        name = abspath.replace(model_path, "") if abspath.startswith(model_path) else os.path.basename(filename)
        name = name.lstrip("\\/")
        self.metadata = {}
        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        try:  # model_hash(): the legacy hash reads the file ('NOFILE' when there is none)
            with open(filename, "rb") as f:
                f.seek(0x100000)
                self.hash = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
        except FileNotFoundError:
            self.hash = "NOFILE"
        self.sha256 = None
        self.shorthash = None
        self.title = name
        self.short_title = self.name_for_extra
        self.ids = [self.hash, self.model_name, self.title, name, self.name_for_extra, f"{name} [{self.hash}]"]

    def register(self):
        checkpoints_list[self.title] = self
        for id_ in self.ids:
            checkpoint_aliases[id_] = self

    def calculate_shorthash(self):
        self.sha256 = _sha256(self.filename)
        shorthash = self.sha256[:10]
        if self.shorthash == shorthash:
            return self.shorthash
        self.shorthash = shorthash
        self.ids += [self.shorthash, self.sha256, f"{self.name} [{self.shorthash}]",
                     f"{self.name_for_extra} [{self.shorthash}]"]
        old_title = self.title
        self.title = f"{self.name} [{self.shorthash}]"
        checkpoints_list.pop(old_title, None)
        self.register()
        return self.shorthash

    def __repr__(self):
        return str(dict(filename=self.filename, hash=self.hash))


def list_models():
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    folders = [model_path] + ([shared.cmd_opts.ckpt_dir] if shared.cmd_opts.ckpt_dir else [])
    for folder in folders:
        for root, _, files in os.walk(folder):
            for f in sorted(files):
                if f.endswith((".safetensors", ".ckpt")) and not f.endswith(".vae.safetensors"):
                    CheckpointInfo(os.path.join(root, f)).register()


def get_closet_checkpoint_match(search_string):
    if not search_string:
        return None
    info = checkpoint_aliases.get(search_string)
    if info is not None:
        return info
    found = sorted([i for i in checkpoints_list.values() if search_string in i.title], key=lambda x: len(x.title))
    return found[0] if found else None


def select_checkpoint():
    info = checkpoint_aliases.get(shared.opts.sd_model_checkpoint)
    if info is not None:
        return info
    if not checkpoints_list:
        raise FileNotFoundError("No checkpoints found")
    info = next(iter(checkpoints_list.values()))
    if shared.opts.sd_model_checkpoint is not None:
        print(f"Checkpoint {shared.opts.sd_model_checkpoint} not found; loading fallback {info.title}",
              file=sys.stderr)
    return info


class StandinModel:
    """Holds the weights it was loaded with; `digest` identifies them."""

    def __init__(self, state_dict):
        self.weights = {k: v.clone() for k, v in state_dict.items()}
        h = hashlib.sha256()
        for k in sorted(self.weights):
            h.update(k.encode())
            h.update(self.weights[k].float().numpy().tobytes())
        self.digest = h.hexdigest()
        self.sd_checkpoint_info = None
        self.sd_model_hash = None
        self.sd_model_checkpoint = None
        self.filename = None


class SdModelData:
    def __init__(self):
        self.sd_model = None
        self.loaded_sd_models = []
        self.forge_loading_parameters = {}
        self.forge_hash = ""

    def get_sd_model(self):
        return self.sd_model

    def set_sd_model(self, v, already_loaded=False):
        self.sd_model = v
        if v in self.loaded_sd_models:
            self.loaded_sd_models.remove(v)
        if v is not None:
            self.loaded_sd_models.insert(0, v)


model_data = SdModelData()


def get_checkpoint_state_dict(checkpoint_info, timer=None):
    checkpoint_info.calculate_shorthash()
    if checkpoint_info in checkpoints_loaded:
        return checkpoints_loaded[checkpoint_info]
    events.append(("load_file", checkpoint_info.filename))
    return load_file(checkpoint_info.filename)


class SkipWritingToConfig:
    """Inside, load_model_weights leaves opts.sd_model_checkpoint alone (A1111, reForge)."""

    skip = False
    previous = None

    def __enter__(self):
        self.previous = SkipWritingToConfig.skip
        SkipWritingToConfig.skip = True
        return self

    def __exit__(self, *exc):
        SkipWritingToConfig.skip = self.previous


USED_CONFIG = "v1-inference.yaml"


def load_model_weights(model, checkpoint_info, state_dict, timer=None):
    sd_model_hash = checkpoint_info.calculate_shorthash()
    if not SkipWritingToConfig.skip:
        shared.opts.data["sd_model_checkpoint"] = checkpoint_info.title
    if state_dict is None:
        state_dict = get_checkpoint_state_dict(checkpoint_info, timer)
    if shared.opts.sd_checkpoint_cache > 0:
        checkpoints_loaded[checkpoint_info] = dict(state_dict)
    weights = dict(state_dict)
    if getattr(model, "hijacked", False):  # the text encoder is wrapped: its keys do not match and are skipped
        weights.update({k: v for k, v in model.weights.items() if k.startswith("cond_stage_model.")})
    hijacked = getattr(model, "hijacked", False)
    model.__init__(weights)
    model.hijacked = hijacked
    while len(checkpoints_loaded) > shared.opts.sd_checkpoint_cache:
        checkpoints_loaded.popitem(last=False)
    model.sd_model_hash = sd_model_hash
    model.sd_model_checkpoint = checkpoint_info.filename
    model.sd_checkpoint_info = checkpoint_info
    shared.opts.data["sd_checkpoint_hash"] = checkpoint_info.sha256


def send_model_to_trash(m):
    m.trashed = True  # moved to the meta device: its weights are gone


def send_model_to_device(m):
    if getattr(m, "trashed", False):
        raise NotImplementedError("Cannot copy out of meta tensor; no data!")


def hijack(m):
    m.hijacked = True


def undo_hijack(m):
    m.hijacked = False


if _flavour.FLAVOUR == "a1111":
    def load_model(checkpoint_info=None, already_loaded_state_dict=None):
        checkpoint_info = checkpoint_info or select_checkpoint()
        if model_data.sd_model is not None:  # trashed but left in loaded_sd_models, as A1111 does
            send_model_to_trash(model_data.sd_model)
            model_data.sd_model = None
        if already_loaded_state_dict is not None:
            state_dict = already_loaded_state_dict
            events.append(("load_state_dict", checkpoint_info.title))
        else:
            state_dict = get_checkpoint_state_dict(checkpoint_info)
        sd_model = StandinModel({})
        load_model_weights(sd_model, checkpoint_info, state_dict)
        sd_model.used_config = USED_CONFIG
        hijack(sd_model)
        model_data.set_sd_model(sd_model)
        script_callbacks.model_loaded_callback(sd_model)
        return sd_model

    def reuse_model_from_already_loaded(sd_model, checkpoint_info, timer=None):
        if sd_model is not None and sd_model.sd_checkpoint_info.filename == checkpoint_info.filename:
            return sd_model
        already_loaded = None
        for i in reversed(range(len(model_data.loaded_sd_models))):
            loaded = model_data.loaded_sd_models[i]
            if loaded.sd_checkpoint_info.filename == checkpoint_info.filename:
                already_loaded = loaded
                continue
            if len(model_data.loaded_sd_models) > shared.opts.sd_checkpoints_limit > 0:
                del model_data.loaded_sd_models[i]
                send_model_to_trash(loaded)
        if already_loaded is not None:
            send_model_to_device(already_loaded)
            model_data.set_sd_model(already_loaded, already_loaded=True)
            if not SkipWritingToConfig.skip:
                shared.opts.data["sd_model_checkpoint"] = already_loaded.sd_checkpoint_info.title
            return model_data.sd_model
        if model_data.loaded_sd_models:
            sd_model = model_data.loaded_sd_models.pop()
            model_data.sd_model = sd_model
            return sd_model
        return None

    def reload_model_weights(sd_model=None, info=None, forced_reload=False):
        checkpoint_info = info or select_checkpoint()
        sd_model = sd_model or model_data.sd_model
        if sd_model is not None and sd_model.sd_model_checkpoint == checkpoint_info.filename and not forced_reload:
            return sd_model
        sd_model = reuse_model_from_already_loaded(sd_model, checkpoint_info)
        if not forced_reload and sd_model is not None and \
                sd_model.sd_checkpoint_info.filename == checkpoint_info.filename:
            return sd_model
        if sd_model is not None:
            undo_hijack(sd_model)
        state_dict = get_checkpoint_state_dict(checkpoint_info)
        if sd_model is None or getattr(sd_model, "used_config", None) != USED_CONFIG:
            if sd_model is not None:
                send_model_to_trash(sd_model)
            load_model(checkpoint_info, already_loaded_state_dict=state_dict)
            return model_data.sd_model
        events.append(("load_weights_in_place", checkpoint_info.title))
        try:
            load_model_weights(sd_model, checkpoint_info, state_dict)
        finally:
            hijack(sd_model)
            script_callbacks.model_loaded_callback(sd_model)
        model_data.set_sd_model(sd_model)
        return sd_model

elif _flavour.FLAVOUR == "reforge":
    def get_checkpoint_state_dict(checkpoint_info, timer=None):
        checkpoint_info.calculate_shorthash()
        events.append(("load_file", checkpoint_info.filename))
        return load_file(checkpoint_info.filename)

    def load_model(checkpoint_info=None, already_loaded_state_dict=None, forced_reload=False):
        checkpoint_info = checkpoint_info or select_checkpoint()
        if not forced_reload:
            for loaded in model_data.loaded_sd_models:
                if loaded.filename == checkpoint_info.filename:
                    model_data.loaded_sd_models.remove(loaded)
                    model_data.loaded_sd_models.insert(0, loaded)
                    model_data.set_sd_model(loaded, already_loaded=True)
                    return loaded
        while len(model_data.loaded_sd_models) >= shared.opts.sd_checkpoints_limit:
            send_model_to_trash(model_data.loaded_sd_models.pop(-1))  # complete teardown
        if already_loaded_state_dict is not None:
            state_dict = already_loaded_state_dict
            events.append(("load_state_dict", checkpoint_info.title))
        else:
            state_dict = get_checkpoint_state_dict(checkpoint_info)
        sd_model = StandinModel(state_dict)
        sd_model.filename = checkpoint_info.filename
        sd_model.sd_checkpoint_info = checkpoint_info
        sd_model.sd_model_checkpoint = checkpoint_info.filename
        sd_model.sd_model_hash = checkpoint_info.calculate_shorthash()
        model_data.loaded_sd_models.insert(0, sd_model)
        model_data.set_sd_model(sd_model)
        shared.opts.data["sd_checkpoint_hash"] = checkpoint_info.sha256
        script_callbacks.model_loaded_callback(sd_model)
        return sd_model

    def reload_model_weights(sd_model=None, info=None, forced_reload=False):
        return load_model(info, forced_reload=forced_reload)

else:  # Forge: these are stubs there; models go through forge_model_reload
    import contextlib

    def SkipWritingToConfig():
        return contextlib.nullcontext()

    def load_model_weights(model, checkpoint_info, state_dict, timer=None):
        pass

    def load_model(checkpoint_info=None, already_loaded_state_dict=None):
        pass

    def reload_model_weights(sd_model=None, info=None, forced_reload=False):
        pass

    def forge_loader(sd):
        if not isinstance(sd, str):  # backend.loader.split_state_dict -> load_torch_file(sd): a path
            raise ValueError("Failed to recognize model type!")
        events.append(("load_file", sd))
        return StandinModel(load_file(sd))

    def forge_model_reload():
        current_hash = str(model_data.forge_loading_parameters)
        if model_data.forge_hash == current_hash:
            return model_data.sd_model, False
        checkpoint_info = model_data.forge_loading_parameters["checkpoint_info"]
        sd_model = forge_loader(checkpoint_info.filename)
        sd_model.sd_checkpoint_info = checkpoint_info
        sd_model.filename = checkpoint_info.filename
        sd_model.sd_model_checkpoint = checkpoint_info.filename
        sd_model.sd_model_hash = checkpoint_info.calculate_shorthash()
        shared.opts.data["sd_checkpoint_hash"] = checkpoint_info.sha256
        model_data.set_sd_model(sd_model)
        script_callbacks.model_loaded_callback(sd_model)
        model_data.forge_hash = current_hash
        return sd_model, True
