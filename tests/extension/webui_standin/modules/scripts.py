"""Scripts: Script base class, AlwaysVisible, scripts_data (ScriptClassData) and a loader that runs each
scripts/*.py under its file name with the extension root on sys.path only while it loads."""
import importlib.util
import inspect
import os
import sys
import traceback
from collections import namedtuple

from modules import script_callbacks

AlwaysVisible = object()
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_data = []
errors = []


class Script:
    filename = None
    args_from = None
    args_to = None
    alwayson = False

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def run(self, p, *args):
        pass

    def before_process(self, p, *args):
        pass


def load_module(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_scripts(script_files):
    """script_files: [(basedir, path)]; basedir goes on sys.path only while its script loads."""
    scripts_data.clear()
    script_callbacks.clear_callbacks()
    syspath = sys.path
    for basedir, path in script_files:
        try:
            sys.path = [basedir, *syspath]
            module = load_module(path)
            for obj in module.__dict__.values():
                if inspect.isclass(obj) and issubclass(obj, Script) and obj is not Script:
                    scripts_data.append(ScriptClassData(obj, path, basedir, module))
        except Exception:
            errors.append(path)
            traceback.print_exc()
        finally:
            sys.path = syspath


class ScriptRunner:
    def __init__(self):
        self.scripts = []
        self.alwayson_scripts = []
        self.selectable_scripts = []

    def initialize_scripts(self, is_img2img):
        self.scripts.clear()
        self.alwayson_scripts.clear()
        self.selectable_scripts.clear()
        for data in scripts_data:
            script = data.script_class()
            script.filename = data.path
            visibility = script.show(is_img2img)
            if visibility is AlwaysVisible:
                self.scripts.append(script)
                self.alwayson_scripts.append(script)
                script.alwayson = True
            elif visibility:
                self.scripts.append(script)
                self.selectable_scripts.append(script)

    def setup_ui(self, is_img2img=False):
        """Each script's ui() once, as when the txt2img tab is built; args_from/args_to index p.script_args."""
        inputs = [None]
        for script in self.scripts:
            controls = script.ui(is_img2img) or []
            script.args_from = len(inputs)
            inputs += list(controls)
            script.args_to = len(inputs)
        return inputs

    def before_process(self, p):
        for script in self.alwayson_scripts:
            try:
                script.before_process(p, *p.script_args[script.args_from:script.args_to])
            except Exception:
                errors.append(f"before_process: {script.filename}")
                traceback.print_exc()

    def script(self, title):
        return next(s for s in self.scripts if s.title() == title)


scripts_txt2img = ScriptRunner()
