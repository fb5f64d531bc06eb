"""opts (settings with .data and set()), state (the running job), cmd_opts, and `sd_model` as a module
property that reads sd_models.model_data, as in A1111's shared.py."""
import sys
import types

from modules import _flavour


class Options:
    def __init__(self):
        self.__dict__["data"] = {"sd_model_checkpoint": None, "sd_checkpoint_hash": "", "sd_checkpoint_cache": 0,
                                 "sd_checkpoints_limit": 1, "CLIP_stop_at_last_layers": 1}

    def __getattr__(self, key):
        try:
            return self.__dict__["data"][key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key, value):
        self.data[key] = value

    def set(self, key, value, is_api=False, run_callbacks=True):
        if self.data.get(key) == value:
            return False
        self.data[key] = value
        return True

    def get_default(self, key):
        return None


class State:
    interrupted = False
    skipped = False
    stopping_generation = False
    job = ""
    job_count = 0
    begun = 0

    def begin(self, job="(unknown)"):
        self.job = job
        self.interrupted = False
        self.begun += 1

    def end(self):
        self.job = ""

    def interrupt(self):
        self.interrupted = True


opts = Options()
state = State()
cmd_opts = types.SimpleNamespace(ckpt_dir=None, ckpt=None, no_half=False)
forge = _flavour.FORGE


class Shared(types.ModuleType):
    @property
    def sd_model(self):
        from modules import sd_models

        return sd_models.model_data.get_sd_model()

    @sd_model.setter
    def sd_model(self, value):
        from modules import sd_models

        sd_models.model_data.set_sd_model(value)


sys.modules[__name__].__class__ = Shared
