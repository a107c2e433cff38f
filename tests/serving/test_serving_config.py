"""Server configuration: defaults, SERVING_* variables, flags, and errors that name the setting."""

from __future__ import annotations

import pytest

from serving.cli import main
from serving.config import ConfigError, ServerConfig, batch_views, load_config


class TestSources:
    def test_defaults(self):
        c = load_config({"bundle": "b"}, environ={})
        assert c.port == 50051 and c.precision == "fp32" and c.metrics_port == 9464 and c.tls_cert is None
        assert c.max_batch_views == 0 and c.max_delay_us == 2000 and c.max_queue == 256
        assert c.model_instances == 2 and c.spinning is False

    @pytest.mark.parametrize("setting, cuda, expected", [(0, False, 4), (0, True, 64), (16, False, 16), (16, True, 16)])
    def test_auto_batch_size_is_one_image_on_cpus_and_64_views_on_cuda(self, setting, cuda, expected):
        c = load_config({"bundle": "b", "max_batch_views": setting}, environ={})
        assert batch_views(c, 4, cuda) == expected

    def test_environment_overrides_defaults_and_flags_override_the_environment(self):
        env = {"SERVING_BUNDLE": "b", "SERVING_MAX_QUEUE": "128", "SERVING_PRECISION": "int8", "SERVING_PORT": "1"}
        c = load_config({"port": "2", "max_delay_us": None}, environ=env)
        assert (c.max_queue, c.precision, c.port, c.max_delay_us) == (128, "int8", 2, 2000)

    @pytest.mark.parametrize("value, expected", [("off", None), ("none", None), ("0", 0), ("9100", 9100)])
    def test_metrics_port_can_be_turned_off(self, value, expected):
        assert load_config({"bundle": "b", "metrics_port": value}, environ={}).metrics_port == expected

    def test_tls_files(self, tmp_path):
        cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
        cert.write_text("c")
        key.write_text("k")
        c = load_config({"bundle": "b", "tls_cert": str(cert), "tls_key": str(key)}, environ={})
        assert (c.tls_cert, c.tls_key) == (cert, key)


class TestErrors:
    @pytest.mark.parametrize(
        "flags, message",
        [
            ({}, "bundle: Field required"),
            ({"max_queue": "0"}, "max_queue: Input should be greater than or equal to 1 (got '0')"),
            ({"precision": "bf16"}, "precision: Input should be 'fp32', 'fp16' or 'int8' (got 'bf16')"),
            ({"metrics_port": "http"}, "metrics_port: Input should be a valid integer"),
            ({"tls_cert": "/nonexistent/cert.pem"}, "tls_cert: /nonexistent/cert.pem: no such file"),
            ({"max_batch_images": "8", "max_queue": "4"}, "max_batch_images 8 is more than max_queue 4"),
            (
                {"max_message_bytes": "4096", "max_image_bytes": "8192"},
                "max_message_bytes 4096 must exceed max_image_bytes",
            ),
        ],
    )
    def test_messages_name_the_setting(self, flags, message):
        flags = {"bundle": "b", **flags} if flags else flags
        with pytest.raises(ConfigError) as err:
            load_config(flags, environ={})
        assert message in str(err.value)
        assert "Value error" not in str(err.value)

    def test_tls_needs_both_files(self, tmp_path):
        (tmp_path / "cert.pem").write_text("c")
        with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
            load_config({"bundle": "b", "tls_cert": str(tmp_path / "cert.pem")}, environ={})


def test_serve_help_documents_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name, field in ServerConfig.model_fields.items():
        assert f"--{name.replace('_', '-')}" in text
        assert f"SERVING_{name.upper()})" in text, name
        if not field.is_required():
            shown = "off" if field.default is None else field.default
            assert f"(default: {shown}; env SERVING_{name.upper()})" in text, name
    assert "RESOURCE_EXHAUSTED" in text
