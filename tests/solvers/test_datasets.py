import numpy as np
import pytest
import torch
from support import shared_data

from raysys.runtime.errors import ConfigError
from raysys.solvers.datasets import (
    generate_instances,
    load_instances,
    sample_instances,
    with_references,
)
from raysys.solvers.errors import DataFormatError, InvalidInstance
from raysys.solvers.families import Instance, get_family


class NotATensor:
    """An arbitrary class a safe loader must refuse to rebuild."""


def test_benchmark_npz_and_pt_give_the_same_coefficients():
    npz = load_instances(shared_data("pde/darcy_test_16.npz"))
    pt = load_instances(shared_data("pde/darcy_test_16.pt"))
    assert len(npz) == len(pt) == 50
    raw = np.load(shared_data("pde/darcy_test_16.npz"))["x"]
    for k in (0, 17, 49):
        a = npz[k].fields["a"]
        assert a.shape == (16, 16)
        np.testing.assert_array_equal(a, np.where(raw[k], 12.0, 3.0))
        np.testing.assert_array_equal(a, pt[k].fields["a"])
        assert npz[k].family == "darcy"


def test_benchmark_layout_reads_the_same_from_pt_and_npz(tmp_path):
    # The FNO benchmark's layout, written here: a boolean mask ``x`` (12 where
    # true, 3 where false) and the solution ``y``, once as .pt, once as .npz.
    import torch

    rng = np.random.default_rng(3)
    mask = rng.random((4, 9, 9)) < 0.5
    y = rng.standard_normal((4, 9, 9)).astype(np.float32)
    torch.save(
        {"x": torch.from_numpy(mask), "y": torch.from_numpy(y)}, tmp_path / "b.pt"
    )
    np.savez(tmp_path / "b.npz", x=mask, y=y)
    pt, npz = load_instances(tmp_path / "b.pt"), load_instances(tmp_path / "b.npz")
    assert len(pt) == len(npz) == 4
    for k in range(4):
        expected = np.where(mask[k], 12.0, 3.0)
        np.testing.assert_array_equal(pt[k].fields["a"], expected)
        np.testing.assert_array_equal(npz[k].fields["a"], expected)
        assert pt[k].family == npz[k].family == "darcy"


def test_user_npz_with_coefficients_and_forcing(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.uniform(1, 2, (3, 8, 8))
    f = rng.uniform(0, 1, (3, 8, 8))
    np.savez(tmp_path / "mine.npz", a=a, f=f)
    insts = load_instances(tmp_path / "mine.npz")
    assert [i.name for i in insts] == ["mine-0", "mine-1", "mine-2"]
    np.testing.assert_array_equal(insts[2].fields["a"], a[2])
    _, b = get_family("darcy").assemble(insts[1])
    np.testing.assert_array_equal(b, f[1].ravel())


def test_single_field_and_convection_diffusion_files(tmp_path):
    np.savez(tmp_path / "one.npz", a=np.ones((5, 5)))
    assert len(load_instances(tmp_path / "one.npz")) == 1
    np.savez(
        tmp_path / "cd.npz",
        vx=np.zeros((2, 6, 6)),
        vy=np.ones((2, 6, 6)),
        epsilon=np.array([0.1, 0.2]),
    )
    cd = load_instances(tmp_path / "cd.npz")
    assert cd[1].family == "convection-diffusion"
    assert cd[1].scalars["epsilon"] == pytest.approx(0.2)


def test_unknown_arrays_missing_files_and_pickles_are_refused(tmp_path):
    np.savez(tmp_path / "odd.npz", q=np.ones((2, 4, 4)))
    with pytest.raises(DataFormatError, match="'q'"):
        load_instances(tmp_path / "odd.npz")
    with pytest.raises(DataFormatError, match="does not exist"):
        load_instances(tmp_path / "nope.npz")
    np.savez(tmp_path / "obj.npz", a=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataFormatError):
        load_instances(tmp_path / "obj.npz")

    torch.save({"x": NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(DataFormatError, match="weights_only"):
        load_instances(tmp_path / "evil.pt")


def test_generation_on_ray_is_deterministic_and_independent_of_chunking(ray_cluster):
    big = generate_instances("darcy", 12, 5, seed=3, chunk_size=5)
    small = generate_instances("darcy", 12, 5, seed=3, chunk_size=2)
    local = sample_instances("darcy", 12, 3, range(5), with_reference=True)
    for x, y, z in zip(big, small, local, strict=True):
        assert x.name == y.name == z.name
        np.testing.assert_array_equal(x.fields["a"], y.fields["a"])
        np.testing.assert_array_equal(x.fields["a"], z.fields["a"])
        np.testing.assert_allclose(x.reference, z.reference)
        A, b = get_family("darcy").assemble(x)
        assert np.linalg.norm(A @ x.reference.ravel() - b) < 1e-9 * np.linalg.norm(b)
    other = generate_instances("darcy", 12, 1, seed=4)
    assert not np.array_equal(other[0].fields["a"], big[0].fields["a"])


def test_references_of_read_instances_are_solved_on_ray(ray_cluster, tmp_path):
    np.savez(tmp_path / "r.npz", a=np.full((2, 6, 6), 3.0))
    insts = with_references(load_instances(tmp_path / "r.npz"))
    A, b = get_family("darcy").assemble(insts[0])
    np.testing.assert_allclose(A @ insts[0].reference.ravel(), b, rtol=1e-10)


def _refused(path, match):
    with pytest.raises(DataFormatError, match=match) as info:
        load_instances(path)
    assert isinstance(info.value, ConfigError)  # the job prints it as `error: ...`
    return str(info.value)


def test_broken_npz_files_are_refused_with_the_file_and_the_problem(tmp_path):
    np.savez(tmp_path / "good.npz", a=np.ones((3, 6, 6)))
    raw = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    _refused(tmp_path / "cut.npz", "cut.npz: not a readable .npz")
    (tmp_path / "text.npz").write_bytes(b"PK\x03\x04 not really a zip")
    _refused(tmp_path / "text.npz", "not a readable .npz")
    (tmp_path / "dir.npz").mkdir()
    _refused(tmp_path / "dir.npz", "is a folder")
    # Neither suggests loading the file as a pickle, as numpy's own error does.
    (tmp_path / "plain.npz").write_text("a,b\n1,2\n")
    msg = _refused(
        tmp_path / "plain.npz", r"plain.npz: not an .npz archive \(not a zip"
    )
    assert "pickle" not in msg
    np.save(tmp_path / "one.npy", np.ones((3, 6, 6)))
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    _refused(tmp_path / "one.npz", r"not an .npz archive \(a single .npy array\)")

    np.savez(tmp_path / "af.npz", a=np.ones((3, 6, 6)), f=np.ones((2, 6, 6)))
    msg = _refused(tmp_path / "af.npz", "'f' holds 2 instances but 'a' holds 3")
    assert str(tmp_path / "af.npz") in msg
    cd = {"vx": np.zeros((3, 6, 6)), "vy": np.ones((2, 6, 6)), "epsilon": 0.1}
    np.savez(tmp_path / "v.npz", **cd)
    _refused(tmp_path / "v.npz", "'vy' holds 2 instances but 'vx' holds 3")
    cd |= {"vy": np.ones((3, 6, 6)), "epsilon": np.array([0.1, 0.2])}
    np.savez(tmp_path / "eps.npz", **cd)
    _refused(tmp_path / "eps.npz", "'epsilon' holds 2 instances but 'vx' holds 3")

    np.savez(tmp_path / "str.npz", x=np.array([[["1", "2"], ["3", "4"]]]))
    _refused(tmp_path / "str.npz", "'x' has dtype <U1")
    np.savez(tmp_path / "cplx.npz", a=np.ones((2, 6, 6)) * (1 + 1j))
    _refused(tmp_path / "cplx.npz", "'a' is complex")
    np.savez(tmp_path / "empty.npz", a=np.zeros((0, 6, 6)))
    _refused(tmp_path / "empty.npz", "holds 0 instances")


def test_one_epsilon_or_one_per_instance_is_accepted(tmp_path):
    fields = {"vx": np.zeros((2, 6, 6)), "vy": np.ones((2, 6, 6))}
    for eps in (0.05, np.array([0.05]), np.array([0.05, 0.05])):
        np.savez(tmp_path / "cd.npz", **fields, epsilon=eps)
        insts = load_instances(tmp_path / "cd.npz")
        assert [i.scalars["epsilon"] for i in insts] == [0.05, 0.05]


def test_a_bad_instance_in_a_reference_solve_gives_its_message_only(ray_cluster):
    bad = Instance("bad-0", "darcy", {"a": np.full((6, 6), -1.0)})
    with pytest.raises(InvalidInstance) as info:
        with_references([bad])
    assert str(info.value).startswith("instance 'bad-0': field 'a' must be positive")
    assert "Traceback" not in str(info.value)


@pytest.mark.parametrize("family", ["darcy", "convection-diffusion"])
@pytest.mark.parametrize("resolution", [0, 1])
def test_a_grid_below_two_is_refused_before_any_task(family, resolution):
    # without Ray running: the check comes before any task is submitted
    with pytest.raises(InvalidInstance, match=f"resolution {resolution} is too"):
        generate_instances(family, resolution, 2, 0)
    with pytest.raises(InvalidInstance, match=f"resolution {resolution} is too"):
        sample_instances(family, resolution, 0, [0], with_reference=False)
