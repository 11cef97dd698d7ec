"""Manifests: CSV and folder forms, side information, paths that try to leave the CSV's folder."""

import pytest

from medflow.errors import InputError
from medflow.manifest import read_manifest
from tests.paired_data import write_paired_csv


def test_csv_with_extra_modality_side_info_and_split(tmp_path):
    (tmp_path / "list.csv").write_text("subject,mri,t2,pet,age,dx,split\ns1,a.nii.gz,b.nii.gz,c.nii.gz,70,AD,test\n")
    (subject,) = read_manifest(tmp_path / "list.csv", ["mri", "t2"])
    assert subject.mri == [tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"]
    assert subject.side == {"age": "70", "dx": "AD"} and subject.split == "test"


@pytest.mark.parametrize("value", ["../secret.nii.gz", "sub/../../secret.nii.gz", "/etc/passwd"])
def test_paths_may_not_leave_the_csv_folder_without_the_flag(tmp_path, value):
    folder = tmp_path / "lists"
    folder.mkdir()
    (folder / "list.csv").write_text(f"mri,pet\n{value},p.nii.gz\n")
    with pytest.raises(InputError, match="allow-outside-paths"):
        read_manifest(folder / "list.csv")
    (subject,) = read_manifest(folder / "list.csv", allow_outside=True)
    assert subject.mri[0].name in ("secret.nii.gz", "passwd")


def test_a_symlinked_data_folder_inside_the_csv_folder_is_not_leaving_it(tmp_path):
    """The rule is about the paths as written (absolute, or ``..`` after normalisation), so a
    data folder that is a symbolic link to another disk is accepted."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "data").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "lists" / "list.csv").write_text("mri,pet\ndata/a.nii.gz,data/../b.nii.gz\n")
    (subject,) = read_manifest(tmp_path / "lists" / "list.csv")
    assert subject.mri == [tmp_path / "lists" / "data" / "a.nii.gz"]
    assert subject.pet == tmp_path / "lists" / "b.nii.gz", "data/../ goes back to the list's folder, not elsewhere/.."


def test_excel_csv_with_byte_order_mark_and_spaces_around_names(tmp_path):
    """Excel's "CSV UTF-8" starts with a byte-order mark; header names and values may carry spaces."""
    text = "subject , mri, t2 ,pet, age\n s1 ,a.nii.gz, b.nii.gz ,c.nii.gz, 70\n"
    (tmp_path / "list.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    (subject,) = read_manifest(tmp_path / "list.csv", ["mri", "t2"])
    assert subject.subject == "s1" and subject.side == {"age": "70"}
    assert subject.mri == [tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"] and subject.pet == tmp_path / "c.nii.gz"


def test_a_csv_in_another_encoding_is_refused_with_its_line(tmp_path):
    """Excel's plain "CSV" on Windows writes cp1252: the error names the line and the way out,
    where the decoder's own message gave a byte offset."""
    text = "mri,pet,site\na.nii.gz,b.nii.gz,K\u00f6ln\n".encode("cp1252")
    for bom in (b"", b"\xef\xbb\xbf"):
        (tmp_path / "list.csv").write_bytes(bom + text)
        with pytest.raises(InputError, match=r'list.csv: line 2 is not UTF-8 text \(byte 0xf6\); save the file as '
                                             r'"CSV UTF-8"'):
            read_manifest(tmp_path / "list.csv")


def test_folder_form_pairs_by_name(tmp_path):
    src = write_paired_csv(tmp_path / "src", n=2).parent
    for kind in ("mri", "pet"):
        (tmp_path / "data" / kind).mkdir(parents=True)
    for i in range(2):
        (src / f"sub-{i:02d}_t1.nii.gz").rename(tmp_path / "data" / "mri" / f"s{i}.nii.gz")
        (src / f"sub-{i:02d}_pet.nii.gz").rename(tmp_path / "data" / "pet" / f"s{i}.nii.gz")
    subjects = read_manifest(tmp_path / "data")
    assert [s.subject for s in subjects] == ["s0", "s1"]
    with pytest.raises(InputError, match="a folder gives one MRI per subject; for mri, t2 give a CSV"):
        read_manifest(tmp_path / "data", ["mri", "t2"])
    (tmp_path / "data" / "pet" / "s1.nii.gz").unlink()
    with pytest.raises(InputError, match="no PET of the same name"):
        read_manifest(tmp_path / "data")


def test_missing_columns_and_empty_cells(tmp_path):
    cases = [("a.csv", "mri\nx.nii.gz\n", "missing column"), ("b.csv", "mri,pet\nx.nii.gz,\n", "empty path"),
             ("c.csv", "mri,pet\n", "c.csv: lists no subjects"), ("d.csv", "", "d.csv: missing column")]
    for name, text, message in cases:
        (tmp_path / name).write_text(text)
        with pytest.raises(InputError, match=message):
            read_manifest(tmp_path / name)
