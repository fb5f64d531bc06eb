"""Names from the UI / HTTP route reach only files inside the configured model folders."""

import os

import pytest

from merge_lab.model_paths import ModelPathError, is_inside, resolve_model, resolve_output


@pytest.fixture
def folders(tmp_path):
    """Two model folders (one with a subfolder), and a secret file and a model outside both."""
    models = tmp_path / "models"
    extra = tmp_path / "extra-models"
    (models / "sdxl").mkdir(parents=True)
    extra.mkdir()
    (models / "a.safetensors").write_bytes(b"a")
    (models / "sdxl" / "juggernaut.safetensors").write_bytes(b"j")
    (extra / "old.ckpt").write_bytes(b"o")
    (models / "notes.txt").write_text("not a model")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.safetensors").write_bytes(b"s")
    (outside / "passwd").write_text("root")
    return models, extra, outside


def one_line_error(name, dirs, match):
    with pytest.raises(ModelPathError, match=match) as info:
        resolve_model(name, dirs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_names_titles_and_relative_paths_resolve(folders):
    models, extra, _ = folders
    dirs = [models, extra]
    a = (models / "a.safetensors").resolve()
    jug = (models / "sdxl" / "juggernaut.safetensors").resolve()
    assert resolve_model("a.safetensors", dirs) == a
    assert resolve_model("a", dirs) == a
    assert resolve_model("a.safetensors [abcdef1234]", dirs) == a
    assert resolve_model("sdxl/juggernaut.safetensors [1a2b3c4d]", dirs) == jug
    assert resolve_model("sdxl/juggernaut.safetensors", dirs) == jug
    assert resolve_model("juggernaut.safetensors", dirs) == jug  # found in a subfolder
    assert resolve_model("old.ckpt", dirs) == (extra / "old.ckpt").resolve()
    assert resolve_model(str(a), dirs) == a  # an absolute path inside a folder is fine


def test_a_literal_name_with_brackets_wins_over_a_title(folders):
    models, _, _ = folders
    odd = models / "mix [v2].safetensors"
    odd.write_bytes(b"m")
    assert resolve_model("mix [v2].safetensors", [models]) == odd.resolve()


def test_dotdot_and_absolute_paths_elsewhere_are_refused(folders):
    models, extra, outside = folders
    dirs = [models, extra]
    one_line_error("../outside/secret.safetensors", dirs, r"contains '\.\.'")
    one_line_error("sdxl/../a.safetensors", dirs, r"contains '\.\.'")  # even when it would land inside
    one_line_error("..\\outside\\secret.safetensors", dirs, r"contains '\.\.'")
    one_line_error(str(outside / "secret.safetensors"), dirs, "outside the model folders")
    one_line_error("/etc/passwd", dirs, "outside the model folders")
    one_line_error(str(models / ".." / "outside" / "secret.safetensors"), dirs, r"contains '\.\.'")


def test_symlinks_are_resolved_and_rechecked(folders):
    models, extra, outside = folders
    (models / "linked.safetensors").symlink_to(outside / "secret.safetensors")
    (models / "linked-dir").symlink_to(outside, target_is_directory=True)
    (models / "inside-link.safetensors").symlink_to(models / "a.safetensors")
    dirs = [models, extra]
    one_line_error("linked.safetensors", dirs, "outside the model folders")
    one_line_error("linked-dir/secret.safetensors", dirs, "outside the model folders")
    assert resolve_model("inside-link.safetensors", dirs) == (models / "a.safetensors").resolve()
    # a symlinked model folder itself is fine: both sides are compared as real paths
    alias = models.parent / "models-alias"
    alias.symlink_to(models, target_is_directory=True)
    assert resolve_model("a.safetensors", [alias]) == (models / "a.safetensors").resolve()
    # the subfolder search does not follow a symlinked folder into the outside
    assert not is_inside(outside / "secret.safetensors", dirs)
    one_line_error("secret.safetensors", dirs, "no model")


def test_other_bad_names(folders):
    models, extra, _ = folders
    dirs = [models, extra]
    one_line_error("", dirs, "empty model name")
    one_line_error("   ", dirs, "empty model name")
    one_line_error("a\x00.safetensors", dirs, "control characters")
    one_line_error("a\n.safetensors", dirs, "control characters")
    one_line_error(42, dirs, "must be a string")
    one_line_error("x" * 5000, dirs, "longer than")
    one_line_error("notes.txt", dirs, "not a checkpoint")
    one_line_error("nope.safetensors", dirs, "no model 'nope.safetensors' in the model folders")
    (models / "dir.safetensors").mkdir()
    one_line_error("dir.safetensors", dirs, "not a file")
    (extra / "sdxl").mkdir()
    (extra / "sdxl" / "juggernaut.safetensors").write_bytes(b"j2")
    msg = one_line_error("juggernaut.safetensors", dirs, "ambiguous")
    assert "sdxl" in msg
    with pytest.raises(ModelPathError, match="no model folders"):
        resolve_model("a.safetensors", [])


def test_output_names_stay_in_the_output_folder(folders, tmp_path):
    models, _, outside = folders
    assert resolve_output("mix", models) == models.resolve() / "mix.safetensors"
    assert resolve_output("sdxl/mix.safetensors", models) == models.resolve() / "sdxl" / "mix.safetensors"
    assert resolve_output("new/sub/mix", models) == models.resolve() / "new" / "sub" / "mix.safetensors"
    for bad, match in [("../mix", r"'\.\.'"), (str(outside / "mix.safetensors"), "absolute path"),
                       ("", "empty"), ("a\rb", "control characters")]:
        with pytest.raises(ModelPathError, match=match):
            resolve_output(bad, models)
    (models / "out-link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ModelPathError, match="outside the output folder"):
        resolve_output("out-link/mix", models)
    (models / "trap.safetensors").symlink_to(outside / "secret.safetensors")
    with pytest.raises(ModelPathError, match="symlink"):
        resolve_output("trap", models)
    with pytest.raises(ModelPathError, match="does not exist"):
        resolve_output("mix", tmp_path / "missing-folder")
    assert sorted(os.listdir(outside)) == ["passwd", "secret.safetensors"]
