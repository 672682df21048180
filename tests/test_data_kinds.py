"""The data-kind table (mlkd_fast.train.training_data.DATA_KINDS) is the one place a kind of --data is
described: parsing, --help and the kinds' own fields all read it."""
import pytest

from mlkd_fast.train import flags
from mlkd_fast.train.training_data import DATA_KINDS, parse_data


@pytest.mark.parametrize("kind", DATA_KINDS, ids=lambda k: k.name)
def test_each_kind_is_described_in_the_help_and_parses_as_written(kind):
    parser = flags.FlagParser(prog="x")
    flags.add_data_arguments(parser)
    help_text = "".join(parser.format_help().split())  # argparse wraps (and breaks words at hyphens)
    assert kind.about, f"{kind.name} has no description for --data's help"
    assert "".join(f"'{kind.written}' ({kind.about})".split()) in help_text
    value = kind.written.replace("PATH", "/some/where")
    parsed, path = parse_data(value)
    assert parsed is kind and (path is None) == ("PATH" not in kind.written)
