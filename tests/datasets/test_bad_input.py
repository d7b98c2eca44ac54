"""Bad raw input gets a DataError that names the file and the line (1-based, as an editor shows it)."""

from __future__ import annotations

import io
import re
import shutil
import zipfile

import pytest

from pipeline.datasets import generate_synthetic, read_movielens
from pipeline.errors import DataError

TINY = dict(n_users=30, n_movies=40, n_ratings=900, seed=2)


@pytest.fixture(scope="module")
def tiny_ml1m(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("raw") / "ml-1m", fmt="ml-1m", **TINY)


@pytest.fixture(scope="module")
def tiny_ml100k(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("raw") / "ml-100k", fmt="ml-100k", **TINY)


@pytest.fixture
def ml1m(tiny_ml1m, tmp_path):
    return shutil.copytree(tiny_ml1m, tmp_path / "ml-1m")


@pytest.fixture
def ml100k(tiny_ml100k, tmp_path):
    return shutil.copytree(tiny_ml100k, tmp_path / "ml-100k")


@pytest.fixture(scope="module")
def tiny_ml25m(tiny_ml1m, tmp_path_factory, ml25m_from_ml1m):
    return ml25m_from_ml1m(tiny_ml1m, tmp_path_factory.mktemp("raw") / "ml-25m")


@pytest.fixture
def ml25m(tiny_ml25m, tmp_path):
    return shutil.copytree(tiny_ml25m, tmp_path / "ml-25m")


def set_line(path, line_number: int, text: str, encoding: str = "latin-1"):
    lines = path.read_bytes().decode(encoding).split("\n")
    lines[line_number - 1] = text
    path.write_bytes("\n".join(lines).encode(encoding))


def line(path, line_number: int) -> list[str]:
    return path.read_bytes().decode("latin-1").split("\n")[line_number - 1].split("::")


def expect(variant, path, *fragments):
    with pytest.raises(DataError) as err:
        read_movielens(variant, path)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)
    return str(err.value)


def test_missing_path_and_missing_file(ml1m, tmp_path):
    expect("ml-1m", tmp_path / "nowhere", "nowhere: no such file or directory")
    (ml1m / "users.dat").unlink()
    expect("ml-1m", ml1m, "users.dat: missing", "ratings.dat, users.dat, movies.dat")


def test_not_a_zip(tmp_path):
    fake = tmp_path / "ml-1m.zip"
    fake.write_text("not a zip")
    expect("ml-1m", fake, "ml-1m.zip: not a folder and not a valid zip file")


def test_wrong_format_csv_where_double_colon_expected(ml1m):
    (ml1m / "ratings.dat").write_text("userId,movieId,rating,timestamp\n1,2,3,4\n")
    expect("ml-1m", ml1m, "ratings.dat line 1: expected 4 fields", "separated by '::', found 1")


def test_malformed_line_wrong_field_count(ml1m):
    set_line(ml1m / "ratings.dat", 7, "1::2::3")
    expect("ml-1m", ml1m, f"{ml1m / 'ratings.dat'} line 7: expected 4 fields", "found 3: '1::2::3'")


def test_non_integer_id(ml1m):
    fields = line(ml1m / "ratings.dat", 5)
    set_line(ml1m / "ratings.dat", 5, "::".join(["u12"] + fields[1:]))
    expect("ml-1m", ml1m, "ratings.dat line 5: userId must be an integer, found 'u12'")


def test_rating_outside_scale(ml1m):
    fields = line(ml1m / "ratings.dat", 9)
    set_line(ml1m / "ratings.dat", 9, "::".join(fields[:2] + ["6"] + fields[3:]))
    expect("ml-1m", ml1m, "ratings.dat line 9: rating 6 is outside 1-5")


def test_half_star_in_whole_star_variant(ml1m):
    fields = line(ml1m / "ratings.dat", 4)
    set_line(ml1m / "ratings.dat", 4, "::".join(fields[:2] + ["3.5"] + fields[3:]))
    expect("ml-1m", ml1m, "ratings.dat line 4: rating 3.5 is outside 1-5 in steps of 1")


def test_unknown_user_and_unknown_movie(ml1m):
    fields = line(ml1m / "ratings.dat", 3)
    set_line(ml1m / "ratings.dat", 3, "::".join(["99999"] + fields[1:]))
    expect("ml-1m", ml1m, "ratings.dat line 3: userId 99999 is not listed in users.dat")
    set_line(ml1m / "ratings.dat", 3, "::".join(fields[:1] + ["77777"] + fields[2:]))
    expect("ml-1m", ml1m, "ratings.dat line 3: movieId 77777 is not listed in movies.dat")


def test_bad_user_codes(ml1m):
    fields = line(ml1m / "users.dat", 2)
    set_line(ml1m / "users.dat", 2, "::".join(fields[:1] + ["X"] + fields[2:]))
    expect("ml-1m", ml1m, "users.dat line 2: gender 'X' is not one of M, F")
    set_line(ml1m / "users.dat", 2, "::".join(fields[:2] + ["17"] + fields[3:]))
    expect("ml-1m", ml1m, "users.dat line 2: age 17 is not one of 1, 18, 25, 35, 45, 50, 56")


def test_duplicate_movie(ml1m):
    first = line(ml1m / "movies.dat", 1)
    set_line(ml1m / "movies.dat", 6, "::".join([first[0], "Copy (1999)", "Drama"]))
    expect("ml-1m", ml1m, f"movies.dat line 6: movieId {first[0]} appears a second time")


def test_empty_file(ml1m):
    (ml1m / "movies.dat").write_bytes(b"")
    expect("ml-1m", ml1m, "movies.dat: the file is empty")


def test_blank_lines_do_not_shift_line_numbers(ml1m):
    text = (ml1m / "ratings.dat").read_text().split("\n")
    fields = text[5].split("::")
    text[5] = "::".join(fields[:2] + ["0"] + fields[3:])
    text.insert(2, "")  # the bad rating now sits on line 7
    (ml1m / "ratings.dat").write_text("\n".join(text))
    expect("ml-1m", ml1m, "ratings.dat line 7: rating 0 is outside 1-5")


def test_error_inside_zip_names_the_member(ml1m, tmp_path):
    set_line(ml1m / "ratings.dat", 2, "2::oops::3::4")
    archive = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in ml1m.iterdir():
            z.write(path, f"ml-1m/{path.name}")
    expect("ml-1m", archive, "ml-1m.zip:ml-1m/ratings.dat line 2: movieId must be an integer, found 'oops'")


def test_ml100k_unknown_occupation_and_bad_item_line(ml100k):
    fields = (ml100k / "u.user").read_text().split("\n")[3].split("|")
    set_line(ml100k / "u.user", 4, "|".join(fields[:3] + ["astronaut"] + fields[4:]))
    expect("ml-100k", ml100k, "u.user line 4: occupation 'astronaut' is not listed in u.occupation")
    shutil.copy(ml100k / "u.user", ml100k / "u.user.bad")
    set_line(ml100k / "u.user", 4, "|".join(fields))
    set_line(ml100k / "u.item", 2, "2|Short line (1995)|01-Jan-1995")
    expect("ml-100k", ml100k, "u.item line 2: expected 24 fields", "found 3")


def test_ml100k_split_naming_unknown_movie(ml100k):
    fields = (ml100k / "ua.test").read_text().split("\n")[0].split("\t")
    set_line(ml100k / "ua.test", 1, "\t".join(fields[:1] + ["5000"] + fields[2:]))
    expect("ml-100k", ml100k, "ua.test line 1: movieId 5000 is not listed in u.item")


def make_ml25m(folder, ratings: str, movies: str = 'movieId,title,genres\n1,"Heat, The (1995)",Action\n'):
    folder.mkdir()
    (folder / "movies.csv").write_text(movies)
    (folder / "ratings.csv").write_text(ratings)
    return folder


def test_ml25m_bad_header_and_half_star_scale(tmp_path):
    expect("ml-25m", make_ml25m(tmp_path / "a", "1::1::4::5\n"), "ratings.csv line 1: expected the header")
    ok = "userId,movieId,rating,timestamp\n1,1,4.5,1\n2,1,0.5,2\n"
    read_movielens("ml-25m", make_ml25m(tmp_path / "b", ok))
    message = expect("ml-25m", make_ml25m(tmp_path / "c", ok + "3,1,0.0,3\n"), "ratings.csv line 4: rating 0")
    assert re.search(r"outside 0\.5-5 in steps of 0\.5", message)
    expect("ml-25m", make_ml25m(tmp_path / "d", ok + "3,1,3.25,3\n"), "line 4: rating 3.25")
    expect("ml-25m", make_ml25m(tmp_path / "e", ok + "3,2,3,3\n"), "line 4: movieId 2 is not listed in movies.csv")
    expect(
        "ml-25m", make_ml25m(tmp_path / "f", "userId,movieId,rating,timestamp\n"), "ratings.csv: the file has no rows"
    )


def test_ml25m_unbalanced_quote(tmp_path):
    movies = 'movieId,title,genres\n1,Heat (1995),Action\n2,"Broken, title (1995),Drama\n'
    ratings = "userId,movieId,rating,timestamp\n1,1,4.5,1\n"
    expect("ml-25m", make_ml25m(tmp_path / "a", ratings, movies), "movies.csv line 3")


# -- a damaged zip member is a one-line DataError naming zip:member, whichever way it is read ------------


def damage(archive, member: str, symptom: str, from_end: bool = False) -> None:
    """Flip one byte of ``member``'s compressed data so that zipfile itself fails with ``symptom``.

    The flipped byte is searched for (from the start, or backwards from the end), so the test does not
    depend on the exact bytes a given zlib version writes.
    """
    data = archive.read_bytes()
    info = zipfile.ZipFile(archive).getinfo(member)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    positions = range(info.compress_size)
    for position in reversed(positions) if from_end else positions:
        damaged = bytearray(data)
        damaged[start + position] ^= 0x10
        try:
            zipfile.ZipFile(io.BytesIO(bytes(damaged))).read(member)
        except Exception as err:  # noqa: BLE001 (we look for zipfile's own symptom)
            if symptom in str(err):
                archive.write_bytes(bytes(damaged))
                return
    raise AssertionError(f"no single flipped byte gives {symptom!r} in {member}")


@pytest.mark.parametrize(
    "variant, member, compression, symptom, from_end",
    [
        # '::' files are read whole (read_bytes); zlib notices the first bad deflate code at once ...
        ("ml-1m", "ratings.dat", zipfile.ZIP_DEFLATED, "Error -3 while decompressing", False),
        # ... or decompresses garbage that only the CRC at the end gives away.
        ("ml-1m", "ratings.dat", zipfile.ZIP_DEFLATED, "Bad CRC-32", True),
        ("ml-1m", "users.dat", zipfile.ZIP_DEFLATED, "Bad CRC-32", True),
        # Single-byte separators are streamed into pyarrow's parser: the error is raised inside its reads.
        ("ml-100k", "u.data", zipfile.ZIP_DEFLATED, "Error -3 while decompressing", False),
        ("ml-100k", "u.data", zipfile.ZIP_DEFLATED, "Bad CRC-32", True),
        ("ml-100k", "u.item", zipfile.ZIP_DEFLATED, "Error -3 while decompressing", False),
        ("ml-100k", "ua.test", zipfile.ZIP_DEFLATED, "Bad CRC-32", True),
        ("ml-25m", "ratings.csv", zipfile.ZIP_DEFLATED, "Error -3 while decompressing", False),
        # A stored (uncompressed) header that no longer matches: the CRC, not a wrong header, is the error.
        ("ml-25m", "ratings.csv", zipfile.ZIP_STORED, "Bad CRC-32", False),
        # Zips repacked with other compressors: bzip2 raises OSError, lzma its own LZMAError.
        ("ml-1m", "ratings.dat", zipfile.ZIP_BZIP2, "Invalid data stream", False),
        ("ml-100k", "u.data", zipfile.ZIP_LZMA, "Corrupt input data", False),
    ],
)
def test_a_damaged_zip_member_is_a_one_line_error_naming_it(
    variant, member, compression, symptom, from_end, request, tmp_path, zip_folder
):
    folder = request.getfixturevalue(variant.replace("-", ""))
    archive = zip_folder(folder, tmp_path / f"{variant}.zip", variant, compression)
    damage(archive, f"{variant}/{member}", symptom, from_end)
    message = expect(variant, archive, f"{archive}:{variant}/{member}: cannot read this file from the zip", symptom)
    assert "\n" not in message


def test_a_zip_cut_short_while_it_is_read_names_the_member(ml1m, tmp_path, zip_folder):
    import os

    from pipeline.datasets import ml1m as ml1m_reader
    from pipeline.datasets.source import RawFiles

    archive = zip_folder(ml1m, tmp_path / "ml-1m.zip", "ml-1m")
    files = RawFiles(archive, "ml-1m", ml1m_reader.FILES)  # holds the zip open, as a reader does
    info = zipfile.ZipFile(archive).getinfo("ml-1m/ratings.dat")
    os.truncate(archive, info.header_offset + 30 + len(info.filename) + 100)  # e.g. overwritten meanwhile
    for read in (lambda: files.read_bytes("ratings.dat"), lambda: files.open("ratings.dat").read()):
        with pytest.raises(DataError, match="ml-1m/ratings.dat: .*the zip file ends inside this member"):
            read()


# -- ids and timestamps: non-negative integers, in every file that holds them --------------------------


SEPARATORS = {
    "ratings.dat": "::", "users.dat": "::", "movies.dat": "::",
    "u.data": "\t", "ua.base": "\t", "ua.test": "\t", "u.user": "|", "u.item": "|",
    "ratings.csv": ",", "movies.csv": ",",
}


def negate_field(folder, name: str, line_number: int, field: int) -> str:
    """Make field ``field`` of line ``line_number`` negative; returns the negative value as written."""
    sep = SEPARATORS[name]
    fields = (folder / name).read_bytes().decode("latin-1").split("\n")[line_number - 1].split(sep)
    fields[field] = f"-{fields[field]}"
    set_line(folder / name, line_number, sep.join(fields))
    return fields[field]


@pytest.mark.parametrize(
    "variant, name, line_number, field, column",
    [
        ("ml-1m", "ratings.dat", 4, 0, "userId"),
        ("ml-1m", "ratings.dat", 4, 1, "movieId"),
        ("ml-1m", "ratings.dat", 4, 3, "timestamp"),
        ("ml-1m", "users.dat", 3, 0, "userId"),
        ("ml-1m", "movies.dat", 3, 0, "movieId"),
        ("ml-100k", "u.data", 5, 0, "userId"),
        ("ml-100k", "u.data", 5, 1, "movieId"),
        ("ml-100k", "u.data", 5, 3, "timestamp"),
        ("ml-100k", "u.user", 2, 0, "userId"),
        ("ml-100k", "u.item", 2, 0, "movieId"),
        ("ml-100k", "ua.base", 6, 1, "movieId"),
        ("ml-100k", "ua.test", 3, 0, "userId"),
        ("ml-100k", "ua.test", 3, 3, "timestamp"),
        ("ml-25m", "ratings.csv", 3, 0, "userId"),  # ml-25m has no users file: nothing else catches it
        ("ml-25m", "ratings.csv", 3, 1, "movieId"),
        ("ml-25m", "ratings.csv", 3, 3, "timestamp"),
        ("ml-25m", "movies.csv", 2, 0, "movieId"),
    ],
)
def test_negative_ids_and_timestamps_are_refused_with_file_and_line(
    variant, name, line_number, field, column, request
):
    folder = request.getfixturevalue(variant.replace("-", ""))
    value = negate_field(folder, name, line_number, field)
    expect(variant, folder, f"{folder / name} line {line_number}: {column} {value} is negative")


# -- a pair in both files of a ready-made split would be in train and valid at once ---------------------


@pytest.mark.parametrize("split", ["ua", "ub"])
def test_a_pair_in_both_split_files_is_an_error_naming_the_test_line(ml100k, split):
    from pipeline.datasets import read_ml100k_split

    base_line = (ml100k / f"{split}.base").read_text().split("\n")[11].split("\t")
    test_line = (ml100k / f"{split}.test").read_text().split("\n")[6].split("\t")
    # Line 7 of the test file now rates the pair of line 12 of the base file (another star, another time).
    set_line(ml100k / f"{split}.test", 7, "\t".join(base_line[:2] + test_line[2:]))
    user, movie = base_line[:2]
    message = f"{split}.test line 7: userId {user}, movieId {movie} is also rated in {split}.base line 12"
    with pytest.raises(DataError, match=re.escape(message)):
        if split == "ua":
            read_movielens("ml-100k", ml100k)  # the official split, as `etl --split official` reads it
        else:
            read_ml100k_split(ml100k, split)
