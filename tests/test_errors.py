from mtrec.errors import first_line


def test_first_line_is_one_short_line():
    e = RuntimeError("\n  CUDA out of memory  \nTraceback ...\n")
    assert first_line(e) == "CUDA out of memory"
    assert first_line(e, typed=True) == "RuntimeError: CUDA out of memory"
    assert first_line(ValueError("x" * 300)) == "x" * 200 + " ..."
    assert first_line(ValueError("x" * 300), limit=240) == "x" * 240 + " ..."
    assert first_line(ValueError("x" * 200)) == "x" * 200
    assert first_line(KeyError()) == first_line(KeyError(), typed=True) == "KeyError"
    assert first_line(OSError(" \n")) == "OSError"
