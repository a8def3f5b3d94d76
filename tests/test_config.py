"""Option parsing: command line > environment > default, for every command."""
import pytest

from sf_bsread_writer import config


def parse_buffer(argv, environ=None):
    return config.parse_args("sf_bsread_buffer", "test", config.BUFFER_OPTIONS, config.BUFFER_ENV_PREFIX,
                             argv, environ or {})


def test_original_spellings_still_work():
    args = parse_buffer(["tcp://src:9999", "-o", "12300", "-b", "100", "--log_level", "DEBUG", "--analyzer"])
    assert args.stream == "tcp://src:9999"
    assert args.output_port == 12300
    assert args.buffer_length == 100
    assert args.log_level == "DEBUG"
    assert args.analyzer is True


def test_defaults_are_secure_and_complete():
    args = parse_buffer(["tcp://src:9999"])
    assert args.bind == "127.0.0.1"
    assert args.source_mode == "pull"
    assert args.output_mode == "pub"
    assert args.ca is False
    assert args.name == "BSBUFFER"


def test_environment_supplies_everything_including_the_positional():
    env = {
        "SF_BSREAD_BUFFER_STREAM": "tcp://env:1",
        "SF_BSREAD_BUFFER_OUTPUT_PORT": "7000",
        "SF_BSREAD_BUFFER_CA": "yes",
        "SF_BSREAD_BUFFER_SOURCE_MODE": "sub",
    }
    args = parse_buffer([], env)
    assert (args.stream, args.output_port, args.ca, args.source_mode) == ("tcp://env:1", 7000, True, "sub")


def test_command_line_wins_over_environment():
    env = {"SF_BSREAD_BUFFER_STREAM": "tcp://env:1", "SF_BSREAD_BUFFER_OUTPUT_PORT": "7000"}
    args = parse_buffer(["tcp://cli:2", "-o", "7001"], env)
    assert (args.stream, args.output_port) == ("tcp://cli:2", 7001)


def test_missing_required_positional_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as raised:
        parse_buffer([])
    assert raised.value.code == 2
    assert "stream" in capsys.readouterr().err.lower()


@pytest.mark.parametrize("name,value", [("SF_BSREAD_BUFFER_OUTPUT_PORT", "eighty"),
                                        ("SF_BSREAD_BUFFER_CA", "maybe"),
                                        ("SF_BSREAD_BUFFER_LOG_LEVEL", "LOUD")])
def test_invalid_environment_value_names_the_variable(name, value, capsys):
    with pytest.raises(SystemExit) as raised:
        parse_buffer(["tcp://src:1"], {name: value})
    assert raised.value.code == 2  # a usage error like a bad option (process.ExitCode.CONFIGURATION), not 1
    assert name in capsys.readouterr().err


def test_invalid_choice_is_rejected(capsys):
    with pytest.raises(SystemExit):
        parse_buffer(["tcp://src:1", "--output-mode", "broadcast"])
    assert "output-mode" in capsys.readouterr().err


def test_list_option_from_environment_and_command_line():
    env = {"SF_BSREAD_CA_BRIDGE_PVS": "A:B, C:D"}
    args = config.parse_args("b", "t", config.BRIDGE_OPTIONS, config.BRIDGE_ENV_PREFIX, ["--pv", "E:F"], env)
    assert args.pvs == ["A:B", "C:D", "E:F"]
    args = config.parse_args("b", "t", config.BRIDGE_OPTIONS, config.BRIDGE_ENV_PREFIX, [], env)
    assert args.pvs == ["A:B", "C:D"]


def test_writer_positionals_as_the_original():
    args = config.parse_args("w", "t", config.WRITER_OPTIONS, config.WRITER_ENV_PREFIX,
                             ["tcp://buf:8889", "out.h5", "-1", "4000", "--log_level=DEBUG"], {})
    assert (args.stream_address, args.output_file, args.user_id, args.rest_port) == \
        ("tcp://buf:8889", "out.h5", -1, 4000)
    assert args.rest_host == "127.0.0.1"
    assert args.log_level == "DEBUG"


def test_configuration_reference_is_up_to_date():
    from tests.helpers import ROOT
    documented = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert documented == config.markdown_reference(), \
        "docs/configuration.md is stale: python -m sf_bsread_writer.config > docs/configuration.md"


def test_every_buffer_option_is_a_buffer_argument_and_misspellings_are_refused():
    """BufferSettings.from_args passes each option by name: a new option without a field fails here, not in use."""
    import dataclasses

    from sf_bsread_writer.buffer.service import Buffer
    from sf_bsread_writer.buffer.settings import BufferSettings

    parameters = {field.name for field in dataclasses.fields(BufferSettings)}
    assert [o.dest for o in config.BUFFER_OPTIONS if o.dest not in parameters] == []
    args = config.parse_args("sf_bsread_buffer", "", config.BUFFER_OPTIONS, config.BUFFER_ENV_PREFIX,
                             ["tcp://127.0.0.1:1", "-b", "7", "--name", "B1"], environ={})
    buffer = Buffer(BufferSettings.from_args(args, rest_port=None))
    settings = buffer.settings
    assert (settings.buffer_length, buffer.name, settings.rest_port) == (7, "B1", None)
    with pytest.raises(TypeError, match="bufer_length"):
        BufferSettings("tcp://127.0.0.1:1", bufer_length=5)  # the misspelling is the point


@pytest.mark.parametrize("address", ["localhost:9999", "tcp://host", "tcp://host:0", "tcp://host:70000", "udp://x:1",
                                     "", "tcp://ho st:1"])
def test_stream_addresses_are_checked_when_the_command_starts(capsys, address):
    for options, prefix, argv in ((config.BUFFER_OPTIONS, config.BUFFER_ENV_PREFIX, [address]),
                                  (config.WRITER_OPTIONS, config.WRITER_ENV_PREFIX, [address, "x.h5", "-1", "0"]),
                                  (config.GATEWAY_OPTIONS, config.GATEWAY_ENV_PREFIX, [address])):
        with pytest.raises(SystemExit) as exit_:
            config.parse_args("cmd", "", options, prefix, argv, environ={})
        assert exit_.value.code == 2
        assert "tcp://host:port" in capsys.readouterr().err or address == ""


def test_good_addresses_pass():
    for address in ("tcp://127.0.0.1:8889", "tcp://camera-ioc.psi.ch:9999", "tcp://[::1]:5", "ipc:///tmp/bs",
                    "tcp://eth0;10.0.0.5:9999", "inproc://feed", "epgm://eth0;239.192.1.1:5555"):
        assert config.zmq_address(address) == address


@pytest.mark.parametrize("command, prefix, options", config.COMMANDS, ids=[item[0] for item in config.COMMANDS])
def test_hidden_options_stay_out_of_help_and_still_work(command, prefix, options):
    """An internal option (help=argparse.SUPPRESS, e.g. the gateway's --ioc-child) is not shown, but parses."""
    parser = config.build_parser(command, "", options, prefix, environ={})
    text = parser.format_help()
    assert "SUPPRESS" not in text, text
    for option in options:
        if option.hidden:
            assert not any(flag in text for flag in option.flags), option
    if command == "sf_bsread_gateway":
        assert parser.parse_args(["tcp://127.0.0.1:1", "--ioc-child"]).ioc_child is True
