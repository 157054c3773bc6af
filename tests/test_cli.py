import subprocess
import sys

import pytest

from fruitlens.cli.main import build_parser, main
from conftest import ROOT


def test_help_for_every_command_has_examples(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {
        "check",
        "split",
        "train",
        "evaluate",
        "predict",
        "export",
        "serve",
        "compare",
        "weights",
        "demo",
        "models",
    } <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert "usage: fruitlens " + name in out and "examples:" in out, name
    for action in ("list", "import"):
        with pytest.raises(SystemExit):
            main(["weights", action, "--help"])
        assert "examples:" in capsys.readouterr().out


def test_errors_are_error_hint_lines_and_traceback_on_request(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nope")]) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "\nhint: " in err and "Traceback" not in err
    assert main(["--traceback", "check", str(tmp_path / "nope")]) == 3
    assert "Traceback" in capsys.readouterr().err


def test_python_dash_m_and_version():
    out = subprocess.run(
        [sys.executable, "-m", "fruitlens", "--version"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT / "src")},
    )
    assert out.returncode == 0 and out.stdout.startswith("fruitlens ")


def test_models_and_weights_list(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "mobilenet_v2" in out and "small_cnn" in out
    assert main(["weights", "list"]) == 0
    assert "mobilenet_v2-b0353104.pth" in capsys.readouterr().out


def test_models_lists_every_backbone_with_torchvision_figures(capsys):
    from torchvision.models import EfficientNet_B0_Weights

    from fruitlens.models import MODELS

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in MODELS}
    assert set(rows) == set(MODELS)
    meta = EfficientNet_B0_Weights.IMAGENET1K_V1.meta  # read from torchvision, not copied into fruitlens
    assert f"{meta['_metrics']['ImageNet-1K']['acc@1']:.1f}%" in rows["efficientnet_b0"]
    assert f"{meta['num_params'] / 1e6:.1f}M" in rows["efficientnet_b0"]
    assert "224 only" in rows["vit_b_16"] and "patch tokens" in rows["vit_b_16"]
    note = " ".join(out.split())
    assert "fruitlens has not measured them" in note and "download into torchvision's cache on first use" in note
    assert main(["weights", "list"]) == 0
    assert "efficientnet_b0_rwightman-7f5810bc.pth" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, says",
    [
        (["predict", "run", "a.jpg", "--batch-size", "0"], "--batch-size: expected a whole number from 1 up"),
        (["predict", "run", "a.jpg", "--top-k", "-1"], "--top-k: expected a whole number from 1 up"),
        (["evaluate", "run", "--batch-size", "x"], "expected a whole number but received 'x'"),
        (["serve", "run", "--port", "99999"], "--port: expected a whole number from 1 to 65535"),
    ],
)
def test_numbers_out_of_range_are_bad_options(args, says, capsys):
    # --batch-size 0 used to loop forever in predict; --port 99999 crashed in bind() as "a bug"
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2 and says in capsys.readouterr().err


def test_serve_on_a_busy_port_says_so_before_loading(tmp_path, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # the model path does not exist: the port is checked first, so this error is about the port
        assert main(["serve", str(tmp_path / "no-run"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "pick another --port" in err


def test_output_into_a_closed_pipe_ends_quietly(monkeypatch, capsys):
    # "fruitlens check DATA | head -1": the reader leaves early; that is no bug to report
    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["models"]) == 0
    assert "unexpected" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, says",
    [
        (["tran", "data/"], "unknown command 'tran'. Did you mean 'train'?"),
        (["predict", "run", "a.jpg", "--top_k", "3"], "--top_k (did you mean --top-k?)"),
        (["train", "data/", "--modle", "x"], "--modle (did you mean --model?)"),
    ],
)
def test_typos_get_the_commands_usage_and_a_suggestion(args, says, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and says in err
    if args[0] != "tran":
        assert f"usage: fruitlens {args[0]}" in err  # the command's usage, not the top level's
