"""The second fault battery: every file the collection reads is checked. Cache entries under $DD_CACHE are
rebuilt when damaged (one line says so); user-supplied files that do not fit are refused in one sentence;
stored labels that do not fit their set (rows, classes, dtype, the images they were made for) are refused
before any training with nothing written; output flags are checked before any work; and SIGTERM sent to
the whole process group (as `timeout`, SLURM and systemd do) during training with DataLoader workers ends
with the one "interrupted" sentence and exit 143, whichever process the signal reaches first.
The many refusal variants run in-process; the signal and end-to-end cases run the scripts as a user does."""
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
import delt
import validate_fkd
from conftest import ROOT, run_script, script_env
from test_reliability import fails_with, hashes, tiny_set

ROOT_CACHE = script_env()["DD_CACHE"]  # the suite's digits teachers (conftest.TEST_ENV)


def labelled_set(folder, logits=None):
    """tiny_set (10 classes x 1 image) with a soft_labels.pt made for it, as INFER writes it."""
    tiny_set(folder)
    labelled = common.set_identity(str(folder))
    logits = torch.randn(labelled["images"], 10).half() if logits is None else logits
    torch.save({"logits": logits, "set": labelled}, folder / "soft_labels.pt")
    return folder, logits


# ------------------------------------------------------------------- labels that do not fit their set
def test_set_identity_follows_the_images(tmp_path):
    folder = tiny_set(tmp_path / "set")
    first = common.set_identity(str(folder))
    assert first["images"] == 10 and common.set_identity(str(folder)) == first
    (folder / "00003" / "00000.png").write_bytes((folder / "00004" / "00000.png").read_bytes())
    assert common.set_identity(str(folder))["digest"] != first["digest"]


@pytest.mark.parametrize("damage,message", [
    (lambda L, s: {"logits": torch.cat([L, L[:1]]), "set": s}, "has 11 rows but the set holds 10 images"),
    (lambda L, s: torch.cat([L, L[:1]]), "has 11 rows but the set holds 10 images"),  # a bare tensor (other tools)
    (lambda L, s: {"logits": torch.cat([L, L[:, :1]], 1), "set": s}, "has 11 columns but the dataset has 10 classes"),
    (lambda L, s: {"logits": L.long(), "set": s}, "holds torch.int64 values, not soft labels"),
    (lambda L, s: {"logits": L, "set": {**s, "digest": "0" * 16}}, "was made for other images than the set holds"),
    (lambda L, s: L[:, 0], "holds a (10,) tensor, not soft labels [images, classes]"),
    (lambda L, s: {"logits": L.float() * float("nan"), "set": s}, "holds NaN or infinite values"),
    (lambda L, s: b"cut", "is a damaged or truncated torch archive"),
    (lambda L, s: "folder", "set has 11 class folders but the dataset has 10 classes"),  # a folder is a class to ImageFolder
])
def test_static_labels_that_do_not_fit_the_set_are_refused_before_training(tmp_path, damage, message):
    folder, logits = labelled_set(tmp_path / "set")
    bad = damage(logits, common.set_identity(str(folder)))
    os.remove(folder / "soft_labels.pt")
    if bad == "folder":
        os.makedirs(folder / "soft_labels.pt")
    elif isinstance(bad, bytes):  # cut short, as by a full disk
        torch.save({"logits": logits}, tmp_path / "whole.pt")
        (folder / "soft_labels.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:300])
    else:
        torch.save(bad, folder / "soft_labels.pt")
    before = hashes(folder)
    for extra in ([], ["--export-ddranking", str(tmp_path / "dd")]):
        with pytest.raises(common.UserError, match=re.escape(message)):
            validate_fkd.main(["--syn-data-path", str(folder), "--protocol", "static", "--epochs", "1", "--workers", "0",
                               *extra])
    assert hashes(folder) == before and not (tmp_path / "dd").exists()  # no eval json, nothing exported


def test_labels_made_for_the_set_are_read(tmp_path):
    folder, logits = labelled_set(tmp_path / "set")
    got = validate_fkd.stored_soft_labels(str(folder / "soft_labels.pt"), common.set_identity(str(folder)), 10)
    assert torch.equal(got, logits)


def test_more_rows_than_images_is_refused_as_a_user_runs_it(tmp_path):
    """The worst case of the battery (a wrong result that looked right) end to end: exit 2, one sentence, no eval json."""
    folder, logits = labelled_set(tmp_path / "set")
    torch.save({"logits": torch.cat([logits, logits]), "set": None}, folder / "soft_labels.pt")
    before = hashes(folder)
    proc = run_script("validate_fkd.py", "--syn-data-path", folder, "--protocol", "static", "--epochs", "1",
                      "--workers", "0", check=False)
    fails_with(proc, f"error: {folder / 'soft_labels.pt'} has 20 rows but the set holds 10 images")
    assert hashes(folder) == before


def test_fkd_labels_that_do_not_fit_the_set_are_refused_before_training(tmp_path):
    folder = tiny_set(tmp_path / "set")
    images, _ = common.load_image_set(str(folder), [{"index": c, "name": str(c), "id": str(c)} for c in range(10)])
    teacher = common.freeze(common.build_model("conv3", 10, 32))
    common.fkd_generate(images, teacher, str(folder), 2, 5, 32, (0.5,) * 3, (0.5,) * 3)
    meta = json.load(open(folder / "fkd_meta.json"))
    assert meta["set"] == common.set_identity(str(folder))
    run = lambda: validate_fkd.main(["--syn-data-path", str(folder), "--protocol", "fkd", "--epochs", "1",  # noqa: E731
                                     "--workers", "0"])

    def refused(message):
        before = hashes(folder)
        with pytest.raises(common.UserError, match=message):
            run()
        assert hashes(folder) == before

    common.atomic_write_json(str(folder / "fkd_meta.json"), {**meta, "images": 11})
    refused("are for 11 images but the set holds 10")
    common.atomic_write_json(str(folder / "fkd_meta.json"), {**meta, "set": {"images": 10, "digest": "0" * 16}})
    refused("were made for other images than the set holds now")
    common.atomic_write_json(str(folder / "fkd_meta.json"), meta)
    rec = torch.load(folder / "fkd_epoch_0000.pt", weights_only=True)
    torch.save({**rec, "logits": [x[:, :9] for x in rec["logits"]]}, folder / "fkd_epoch_0000.pt")
    refused("holds logits for \\[9\\] classes")
    torch.save(rec, folder / "fkd_epoch_0000.pt")
    os.remove(folder / "fkd_epoch_0001.pt")
    refused("fkd_epoch_0001.pt is missing")


# ------------------------------------------------------------------- DELT's ranking file, ours and the official one
def ranking_rows(n=4):
    """A tiny ImageFolder-like dataset: 2 classes x n images with paths, and a score per image."""
    classes = [{"index": 0, "name": "a", "id": "n001"}, {"index": 1, "name": "b", "id": "n002"}]
    targets = [0] * n + [1] * n
    paths = [f"{classes[t]['id']}/{i}.JPEG" for i, t in enumerate(targets)]
    rows = [((i * 7 % 11) / 11, i, t, paths[i]) for i, t in enumerate(targets)]
    return classes, targets, paths, torch.bincount(torch.tensor(targets)), rows


def write_official(path, rows, classes, unnamed=False):
    """The CSV of VILA-Lab/DELT data_selection.py rank(): score, img_path, class (pandas to_csv, index=False)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(([""] if unnamed else []) + ["score", "img_path", "class"])
        for n, (s, _, c, p) in enumerate(sorted(rows, key=lambda r: (r[2], -r[0]))):
            w.writerow(([n] if unnamed else []) + [s, p, classes[c]["id"]])


def test_ranking_file_in_the_official_layout_reads_as_ours(tmp_path):
    classes, targets, paths, counts, rows = ranking_rows()
    delt.write_ranking(str(tmp_path / "ours.csv"), rows, classes)
    ours = delt.read_ranking(str(tmp_path / "ours.csv"), classes, targets, paths, counts)
    for unnamed in (False, True):
        write_official(tmp_path / "official.csv", rows, classes, unnamed)
        assert delt.read_ranking(str(tmp_path / "official.csv"), classes, targets, paths, counts) == ours
    assert ours == {c: [(s, i) for s, i, t, _ in sorted(rows, key=lambda r: (r[2], -r[0], r[1])) if t == c] for c in (0, 1)}


@pytest.mark.parametrize("mangle,message", [
    (lambda text: text[: text.rindex("\n", 0, len(text) - 1) + 9], "is cut short|does not match|has 3 rows for class 1"),
    (lambda text: text.rsplit("\n", 2)[0] + "\n", "has 3 rows for class 1, the dataset 4"),
    (lambda text: text.replace("score,", "prob,", 1), "has the columns"),
    (lambda text: text.replace("n002/7.JPEG", "n002/9.JPEG"), "names an image or class this dataset does not have"),
    (lambda text: text.replace("n002/7.JPEG,n002", "n002/7.JPEG,n001"), "does not match this dataset"),
    (lambda text: text + text.splitlines()[-1] + "\n", "does not match this dataset"),  # a row twice
])
def test_ranking_files_that_do_not_fit_are_refused(tmp_path, mangle, message):
    classes, targets, paths, counts, rows = ranking_rows()
    path = tmp_path / "official.csv"
    write_official(path, rows, classes)
    path.write_text(mangle(path.read_text()))
    with pytest.raises(common.UserError, match=message):
        delt.read_ranking(str(path), classes, targets, paths, counts)
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    with pytest.raises(common.UserError, match="is not a readable CSV|has the columns"):
        delt.read_ranking(str(path), classes, targets, paths, counts)


def test_ranking_file_that_is_a_folder_or_cannot_be_written(tmp_path):
    folder = tmp_path / "ranking"
    os.makedirs(folder)
    out = tmp_path / "out"
    with pytest.raises(common.UserError, match=f"--ranking-file {folder} is a folder"):
        delt.main(["--ranking-file", str(folder), "--out", str(out), "--no-eval"])
    with pytest.raises(common.UserError, match="does not exist and its folder does not either"):
        delt.main(["--ranking-file", str(tmp_path / "no" / "r.csv"), "--out", str(out), "--no-eval"])
    with pytest.raises(common.UserError, match="cannot write the ranking file"):
        delt.write_ranking(str(folder), ranking_rows()[4], ranking_rows()[0])
    assert sorted(os.listdir(tmp_path)) == ["ranking"] and not os.listdir(folder)  # no --out, no stray .tmp


def test_official_ranking_needs_an_image_folder_and_a_foreign_one_leaves_no_out(tmp_path):
    """On digits (in memory: no image files) the official layout cannot name images: one sentence, and the
    failed fresh start removes its --out."""
    path = tmp_path / "official.csv"
    path.write_text("score,img_path,class\n0.5,0/1.png,0\n")
    out = tmp_path / "out"
    proc = run_script("delt.py", "--ranking-file", path, "--out", out, "--no-eval", "--ipc", "1", check=False)
    fails_with(proc, f"error: ranking file {path} has no index column")
    assert not out.exists()


# ------------------------------------------------------------------- the cache: checked on read
def test_read_cached_rebuilds_a_damaged_entry_and_names_one_it_cannot_remove(tmp_path, capsys):
    def load(p):
        value = json.load(open(p))
        if "v" not in value:
            raise ValueError("no v")
        return value["v"]
    path = tmp_path / "entry.json"
    assert common.read_cached(str(path), "thing", load) is None  # absent
    path.write_text('{"v": 3}')
    assert common.read_cached(str(path), "thing", load) == 3
    path.write_text('{"v": 3')  # cut short
    assert common.read_cached(str(path), "thing", load) is None and not path.exists()
    assert f"note: the cached thing {path} was damaged (JSONDecodeError" in capsys.readouterr().out
    sub = tmp_path / "ro"
    os.makedirs(sub / "entry")
    os.chmod(sub, 0o500)
    try:
        if os.access(sub, os.W_OK):
            return  # root ignores permissions: the removal succeeds, as checked above
        with pytest.raises(common.UserError, match=f"the cached thing {sub / 'entry'} is damaged .* cannot be removed"):
            common.read_cached(str(sub / "entry"), "thing", load)
    finally:
        os.chmod(sub, 0o700)


def test_cache_that_is_a_file_or_under_a_file_is_one_sentence(tmp_path):
    cache = tmp_path / "cache"
    cache.write_text("x")
    out = tmp_path / "out"
    proc = run_script("infer_ufc.py", "--teacher", "conv3,conv3", "--ipc", "2", "--out", out, check=False,
                      env={"DD_CACHE": str(cache)})
    fails_with(proc, f"error: the cache folder {cache} ($DD_CACHE) is a file, not a folder")
    assert not out.exists() and cache.read_text() == "x"
    with pytest.raises(common.UserError, match=f"cannot write in the cache folder {cache / 'teachers'}"):
        common.make_cache_dir(str(cache / "teachers"))


def test_damaged_digits_teacher_is_retrained(tmp_path, monkeypatch, capsys):
    """A teacher file cut short (a full disk) is retrained in place, with one line; one epoch keeps the test cheap."""
    path = tmp_path / "teachers" / "digits_conv3_seed0_ep1.pt"
    os.makedirs(path.parent)
    torch.save({"model": common.build_model("conv3", 10, 32).state_dict()}, tmp_path / "whole.pt")
    path.write_bytes((tmp_path / "whole.pt").read_bytes()[:1000])
    monkeypatch.setenv("DD_CACHE", str(tmp_path))
    model = common.digits_teacher("conv3", epochs=1, verbose=False)
    assert f"note: the cached digits teacher conv3 {path} was damaged" in capsys.readouterr().out
    record = torch.load(path, weights_only=True)  # rebuilt whole: a working teacher again
    assert record["arch"] == "conv3" and record["epochs"] == 1 and record["acc"] > 50
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), record["model"].values()))
    assert common.digits_teacher("conv3", epochs=1, verbose=False) is not None and not capsys.readouterr().out  # read back


def test_damaged_cached_ranking_is_ranked_again(tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(os.path.join(ROOT_CACHE, "teachers"), cache / "teachers")
    small = ["--ipc", "1", "--iterations", "2", "--round-itr", "1", "--batch-size", "10", "--no-eval"]
    run_script("delt.py", "--out", tmp_path / "a", *small, env={"DD_CACHE": str(cache), "OMP_NUM_THREADS": "1"})
    (ranking,) = (cache / "delt_ranking").iterdir()
    full = ranking.read_bytes()
    ranking.write_bytes(full[: len(full) // 2])  # cut mid-row
    proc = run_script("delt.py", "--out", tmp_path / "b", *small, env={"DD_CACHE": str(cache), "OMP_NUM_THREADS": "1"})
    assert f"note: the cached DELT ranking {ranking} was damaged" in proc.stdout
    assert ranking.read_bytes() == full and not json.load(open(tmp_path / "b" / "run.json"))["ranking"]["reused"]
    assert (tmp_path / "a" / "ranking.csv").read_bytes() == (tmp_path / "b" / "ranking.csv").read_bytes() == full


# ------------------------------------------------------------------- output flags, other user files, wording
def test_validate_out_folder_gets_the_json_and_a_bad_out_is_refused_before_training(tmp_path):
    assert validate_fkd.result_path(str(tmp_path), "eval_rded.json") == str(tmp_path / "eval_rded.json")
    assert validate_fkd.result_path(str(tmp_path / "new") + "/", "eval_rded.json") == str(tmp_path / "new" / "eval_rded.json")
    assert validate_fkd.result_path(str(tmp_path / "r.json"), "eval_rded.json") == str(tmp_path / "r.json")
    folder = tiny_set(tmp_path / "set")
    (tmp_path / "a_file").write_text("x")
    before = hashes(folder)
    with pytest.raises(common.UserError, match=f"cannot write the result --out {tmp_path / 'a_file' / 'r.json'}"):
        validate_fkd.main(["--syn-data-path", str(folder), "--epochs", "1", "--out", str(tmp_path / "a_file" / "r.json")])
    with pytest.raises(common.UserError, match="--export-ddranking .* is a file, not a folder"):
        validate_fkd.main(["--syn-data-path", str(folder), "--export-ddranking", str(tmp_path / "a_file")])
    assert hashes(folder) == before


def test_every_scripts_output_flags_are_checked_first(tmp_path):
    import d4m
    import dmkd
    import infer_ufc
    import vlcp
    (tmp_path / "a_file").write_text("x")
    bad = str(tmp_path / "a_file" / "out")
    for main, argv in ((delt.main, ["--out", bad]), (infer_ufc.main, ["--out", bad]), (vlcp.main, ["--out", bad]),
                       (d4m.main, ["--out", bad]), (dmkd.main, ["--out", bad]),
                       (d4m.main, ["--out", str(tmp_path / "ok"), "--save-latents", str(tmp_path / "a_file")])):
        with pytest.raises(common.UserError, match="is a file, not a folder"):
            main(argv)
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


def test_other_user_files_are_one_sentence(tmp_path):
    import dmkd
    import vlcp
    binary = tmp_path / "binary"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    with pytest.raises(common.UserError, match="is not a text file of JSON lines"):
        vlcp.read_captions(str(binary))
    (tmp_path / "caps.jsonl").write_text('{"0/00000.png": 5}\n')
    with pytest.raises(common.UserError, match="line 1 holds a caption that is not text"):
        vlcp.read_captions(str(tmp_path / "caps.jsonl"))
    classes = common.class_list("digits")
    for path, message in ((binary, "is not valid JSON"), (tmp_path, "is a folder")):
        with pytest.raises(common.UserError, match=message):
            dmkd.class_imagenet_ids("digits", classes, str(path))
    with pytest.raises(common.UserError, match=f"teacher checkpoint {tmp_path} is a folder, not a checkpoint file"):
        common.load_state(common.build_model("conv3", 10, 32), str(tmp_path), "teacher checkpoint")


def test_infer_ipc_error_speaks_of_the_typed_ipc(tmp_path, digits_conv3):
    import infer_ufc
    with pytest.raises(common.UserError, match=r"--ipc 500 needs K = floor\(IPC\*C/\(C\+M\)\) = 416 real training images "
                                               r"of every class .* but class \d has \d+: lower --ipc"):
        infer_ufc.main(["--teacher", "conv3,conv3", "--ipc", "500", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------- a scheduler's stop, DataLoader workers running
def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


@pytest.mark.parametrize("first", ["group", "workers"])
def test_sigterm_to_the_process_group_with_workers_is_a_clean_stop(tmp_path, first):
    """As `timeout`, SLURM or systemd stop a job: SIGTERM to every process of the group, here during training
    with --workers 2; or to the workers first (they may be scheduled first), then the main process."""
    folder = tiny_set(tmp_path / "set")
    before = hashes(folder)
    cmd = [sys.executable, os.path.join(ROOT, "validate_fkd.py"), "--syn-data-path", str(folder), "--epochs", "500",
           "--workers", "2", "--augment-on", "loader"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a job under a scheduler
    t0 = time.time()
    while len(children(proc.pid)) < 2:  # the training loader's workers are up
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < 300
        time.sleep(0.1)
    time.sleep(0.5)
    if first == "group":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        for pid in children(proc.pid):
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    fails_with(subprocess.CompletedProcess(cmd, proc.returncode, "", err),
               "interrupted: rerun the same command to resume", 143)
    assert "DataLoader worker" not in err and hashes(folder) == before


@pytest.mark.parametrize("signalled", [True, False])
def test_a_worker_that_quits_before_the_main_process_is_signalled(signalled):
    """The race behind the "workers" case above, made certain: the DataLoader reports a worker gone before the
    stop reaches the main process (0.5 s later). That is the stop (exit 143, one line); with no signal following,
    the worker's failure is reported as it is, after a wait of a few seconds."""
    code = ("import os, signal, threading, common\n"
            "def main():\n"
            f"    if {signalled}: threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()\n"
            "    raise RuntimeError('DataLoader worker (pid(s) 1) exited unexpectedly')\n"
            "common.run_cli(main)\n")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=script_env(), capture_output=True, text=True,
                          timeout=120)
    if signalled:
        fails_with(proc, "interrupted: rerun the same command to resume", 143)
        assert "DataLoader worker" not in proc.stderr
    else:
        assert proc.returncode == 1 and proc.stderr.strip().endswith("exited unexpectedly"), proc.stderr
        assert time.time() - t0 >= 3


def test_damaged_cached_latents_are_encoded_again(tiny_sd, tmp_path, monkeypatch, capsys):
    import d4m
    monkeypatch.setenv("DD_CACHE", str(tmp_path / "cache"))
    small = ["--model", tiny_sd, "--size", "64", "--steps", "4", "--ttm-epochs", "0", "--workers", "0", "--ipc", "1",
             "--no-eval"]
    d4m.main([*small, "--out", str(tmp_path / "a")])
    cache = json.load(open(tmp_path / "a" / "run.json"))["latent_cache"]["path"]
    whole = {f: open(os.path.join(cache, f), "rb").read() for f in sorted(os.listdir(cache))}
    cut = os.path.join(cache, "00003.pt")
    with open(cut, "wb") as f:
        f.write(whole["00003.pt"][:200])
    torch.save(torch.zeros(2, 3), os.path.join(cache, "00005.pt"))  # readable, but not this class's latents
    capsys.readouterr()
    d4m.main([*small, "--out", str(tmp_path / "b")])
    out = capsys.readouterr().out
    assert f"note: the cached D4M latents of class 3 {cut} was damaged" in out
    assert "D4M latents of class 5" in out and "not [" in out
    assert json.load(open(tmp_path / "b" / "run.json"))["latent_cache"]["reused_classes"] == 8
    assert {f: open(os.path.join(cache, f), "rb").read() for f in whole} == whole  # encoded again, the same bytes
    assert hashes(tmp_path / "a" / "00003") == hashes(tmp_path / "b" / "00003")  # same latents, same prototypes and images
