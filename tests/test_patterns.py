import pytest
from hypothesis import given, strategies as st

from sparseforge.errors import ConfigError
from sparseforge.patterns import NM, Block, Channel, FanIn, Unstructured, check_fits, parse

patterns = st.one_of(
    st.just(Unstructured()),
    st.just(Channel()),
    st.integers(2, 64).flatmap(lambda m: st.integers(1, m - 1).map(lambda n: NM(n, m))),
    st.builds(Block, st.integers(1, 64), st.integers(1, 64)),
    st.builds(FanIn, st.one_of(st.none(), st.integers(1, 4096))),
)


@given(patterns)
def test_str_parse_round_trip(p):
    assert parse(str(p)) == p
    assert parse(p) is p


@pytest.mark.parametrize(
    "text, expected",
    [("2:4", NM(2, 4)), ("4:8", NM(4, 8)), ("16:32", NM(16, 32)), ("1:4", NM(1, 4)), (" Block4x8 ", Block(4, 8)),
     ("unstructured", Unstructured()), ("fanin", FanIn()), ("fanin16", FanIn(16)), ("channel", Channel())],
)
def test_parse_known_forms(text, expected):
    assert parse(text) == expected


@pytest.mark.parametrize("bad", ["3:2", "2:0", "0:4", "2:2", "block0x4", "block4x0", "block-1x4", "fanin0", "", "dense", "4x4", "2/4", "nm"])
def test_parse_rejects_malformed(bad):
    with pytest.raises(ConfigError) as info:
        parse(bad)
    assert str(info.value)  # message names what was wrong


def test_parse_rejects_non_string():
    with pytest.raises(ConfigError):
        parse(0.5)


def test_nm_sparsity():
    assert NM(2, 4).sparsity == 0.5 and NM(1, 4).sparsity == 0.75 and Unstructured().sparsity is None


def test_check_fits_names_layer_and_fix():
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.mlp.*divisible by M=4.*ignore"):
        check_fits(NM(2, 4), (8, 10), "model.layers.0.mlp")
    with pytest.raises(ConfigError, match="not divisible by block4x4"):
        check_fits(Block(4, 4), (6, 8), "x")
    with pytest.raises(ConfigError, match="keeps more inputs"):
        check_fits(FanIn(9), (4, 8), "x")
    check_fits(NM(2, 4), (3, 8), "ok")
    check_fits(Block(2, 4), (4, 8), "ok")
