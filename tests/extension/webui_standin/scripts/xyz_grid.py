"""Stand-in for the web UI's built-in "X/Y/Z plot" script (scripts/xyz_grid.py, loaded as module "xyz_grid.py").

Same AxisOption signature and module-level axis_options list; the UI copies the list (current_axis_options)
when it is built, run() gets axis indices into that copy. Values are parsed as CSV, converted with the axis
type and confirmed; axes with a higher cost are iterated in the outer loops; each cell applies the axes to a
shallow copy of p and calls process_images; the selected model is reloaded at the end."""
import csv
from copy import copy
from io import StringIO
from itertools import chain

from modules import processing, scripts, sd_models, shared
from modules.processing import Processed, process_images


def apply_field(field):
    def fun(p, x, xs):
        setattr(p, field, x)

    return fun


def apply_prompt(p, x, xs):
    p.prompt = p.prompt.replace(xs[0], x)


def apply_checkpoint(p, x, xs):
    info = sd_models.get_closet_checkpoint_match(x)
    if info is None:
        raise RuntimeError(f"Unknown checkpoint: {x}")
    p.override_settings["sd_model_checkpoint"] = info.name


def format_value_add_label(p, opt, x):
    if type(x) is float:
        x = round(x, 8)
    return f"{opt.label}: {x}"


def format_nothing(p, opt, x):
    return ""


def do_nothing(p, x, xs):
    pass


class AxisOption:
    def __init__(self, label, type, apply, format_value=format_value_add_label, confirm=None, cost=0.0, choices=None,
                 prepare=None):
        self.label = label
        self.type = type
        self.apply = apply
        self.format_value = format_value
        self.confirm = confirm
        self.cost = cost
        self.prepare = prepare
        self.choices = choices


axis_options = [
    AxisOption("Nothing", str, do_nothing, format_value=format_nothing),
    AxisOption("Seed", int, apply_field("seed")),
    AxisOption("Steps", int, apply_field("steps")),
    AxisOption("Prompt S/R", str, apply_prompt),
    AxisOption("Checkpoint name", str, apply_checkpoint, cost=1.0,
               choices=lambda: sorted(sd_models.checkpoints_list, key=str.casefold)),
]


def csv_string_to_list_strip(data_str):
    return list(map(str.strip, chain.from_iterable(csv.reader(StringIO(data_str), skipinitialspace=True))))


class SharedSettingsStackHelper:
    def __enter__(self):
        pass

    def __exit__(self, exc_type, exc_value, tb):
        sd_models.reload_model_weights()


class Script(scripts.Script):
    def title(self):
        return "X/Y/Z plot"

    def ui(self, is_img2img):
        self.current_axis_options = [x for x in axis_options if type(x) is AxisOption]
        return []

    def run(self, p, x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown, z_type, z_values,
            z_values_dropdown, draw_legend=True, include_lone_images=False, include_sub_grids=False,
            no_fixed_seeds=False, vary_seeds_x=False, vary_seeds_y=False, vary_seeds_z=False, margin_size=0,
            csv_mode=False):
        if not no_fixed_seeds:
            processing.fix_seed(p)

        def process_axis(opt, vals, vals_dropdown):
            if opt.label == "Nothing":
                return [0]
            if opt.choices is not None and not csv_mode:
                valslist = vals_dropdown
            else:
                valslist = csv_string_to_list_strip(vals)
            valslist = [opt.type(x) for x in valslist]
            if opt.confirm:
                opt.confirm(p, valslist)
            return valslist

        x_opt, y_opt, z_opt = (self.current_axis_options[t or 0] for t in (x_type, y_type, z_type))
        xs = process_axis(x_opt, x_values, x_values_dropdown)
        ys = process_axis(y_opt, y_values, y_values_dropdown)
        zs = process_axis(z_opt, z_values, z_values_dropdown)

        first, second = "z", "y"
        if x_opt.cost > y_opt.cost and x_opt.cost > z_opt.cost:
            first, second = "x", ("y" if y_opt.cost > z_opt.cost else "z")
        elif y_opt.cost > x_opt.cost and y_opt.cost > z_opt.cost:
            first, second = "y", ("x" if x_opt.cost > z_opt.cost else "z")
        elif z_opt.cost > x_opt.cost and z_opt.cost > y_opt.cost:
            first, second = "z", ("x" if x_opt.cost > y_opt.cost else "y")
        third = ({"x", "y", "z"} - {first, second}).pop()

        cells = {}
        order = []

        def cell(x, y, z, ix, iy, iz):
            if shared.state.interrupted:
                return Processed(p, [], p.seed, "")
            pc = copy(p)
            pc.styles = pc.styles[:]
            x_opt.apply(pc, x, xs)
            y_opt.apply(pc, y, ys)
            z_opt.apply(pc, z, zs)
            try:
                return process_images(pc)
            except Exception as e:
                print(f"Error generating image for xyz plot: {e}")
                return Processed(p, [], p.seed, "")

        values = {"x": xs, "y": ys, "z": zs}
        with SharedSettingsStackHelper():
            for i1, v1 in enumerate(values[first]):
                for i2, v2 in enumerate(values[second]):
                    for i3, v3 in enumerate(values[third]):
                        idx = {first: (i1, v1), second: (i2, v2), third: (i3, v3)}
                        (ix, x), (iy, y), (iz, z) = idx["x"], idx["y"], idx["z"]
                        cells[(ix, iy, iz)] = cell(x, y, z, ix, iy, iz)
                        order.append((ix, iy, iz))

        labels = ([x_opt.format_value(p, x_opt, x) for x in xs], [y_opt.format_value(p, y_opt, y) for y in ys],
                  [z_opt.format_value(p, z_opt, z) for z in zs])
        images = [im for key in sorted(cells) for im in cells[key].images]
        result = Processed(p, images, p.seed, "")
        result.cells, result.order, result.labels = cells, order, labels
        return result
