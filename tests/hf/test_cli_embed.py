import numpy as np
from sentences import minilm_sentences

from jaxopt_serve.cli import main


def test_embed_cli_matches_the_python_api(tmp_path, capsys):
    from jaxopt_serve.hf import SentenceEncoder, bundled_minilm_dir

    lines = minilm_sentences()[:40]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert (
        main(
            [
                "embed",
                "minilm",
                "--input",
                str(tmp_path / "in.txt"),
                "--output",
                str(tmp_path / "e.npy"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert "40 x 384 embeddings" in capsys.readouterr().out
    expected = SentenceEncoder(bundled_minilm_dir()).embed(lines)
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), expected, rtol=1e-4, atol=1e-5)


def test_empty_lines_are_an_error(tmp_path, capsys):
    (tmp_path / "in.txt").write_text("one\n\nthree\n", encoding="utf-8")
    assert main(["embed", "minilm", "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "e.npy")]) == 2
    assert "empty lines [2]" in capsys.readouterr().err
    assert not (tmp_path / "e.npy").exists()
