"""What may leave a federated D-ADDA site (the audit every reply passes), and the federation's credentials."""

import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from anomalib_diffusion.federated.security import make_credentials
from anomalib_diffusion.federated.weights import (
    allowed_shapes,
    audit_reply,
    load_state_arrays,
    state_arrays,
    state_dict_arrays,
)
from anomalib_diffusion.models import DADDA
from tests.conftest import TINY_DADDA


def shapes_of(arrays: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(array.shape) for name, array in arrays.items()}


class TestWeights:
    def test_round_trip_restores_every_weight_and_buffer(self) -> None:
        torch.manual_seed(0)
        source = DADDA(**TINY_DADDA)
        source.model.fitted.fill_(True)
        source.model.type_count.fill_(3)
        torch.manual_seed(1)
        target = DADDA(**TINY_DADDA)
        load_state_arrays(target, state_dict_arrays(source))
        for (name, expected), actual in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
            torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=name)
        assert target.is_fitted()

    def test_averaged_integer_and_boolean_buffers_are_cast_back(self) -> None:
        model = DADDA(**TINY_DADDA)
        arrays = state_arrays(model)
        names = list(model.state_dict())
        arrays[names.index("model.type_count")] = np.array(2.6, dtype=np.float32)
        arrays[names.index("model.fitted")] = np.array(0.75, dtype=np.float32)
        load_state_arrays(model, arrays)
        assert model.model.type_count.dtype == torch.long and int(model.model.type_count) == 3
        assert model.is_fitted()

    def test_weights_of_another_model_shape_are_named(self) -> None:
        other = DADDA(**(TINY_DADDA | {"detector_width": 16}))
        with pytest.raises(ValueError, match=r"arrived with shape .* different settings"):
            load_state_arrays(DADDA(**TINY_DADDA), state_dict_arrays(other))

    def test_weights_under_other_names_are_named(self) -> None:
        arrays = state_dict_arrays(DADDA(**TINY_DADDA))
        arrays["extra"] = arrays.pop("model.fitted")
        with pytest.raises(ValueError, match=r"missing \['model.fitted'\], unexpected \['extra'\]"):
            load_state_arrays(DADDA(**TINY_DADDA), arrays)


@pytest.fixture(scope="module")
def model() -> DADDA:
    return DADDA(**TINY_DADDA)


class TestReplyAudit:
    """``audit_reply``: the check the sites' ClientApp runs on every reply before it leaves (see test_federated)."""

    def test_weights_statistics_and_scalar_metrics_pass(self, model: DADDA) -> None:
        types, dim = model.model.type_weight.shape
        statistics = {"count": (types,), "total": (types, dim), "squares": (types, dim)}
        audit_reply(
            {"arrays": shapes_of(state_dict_arrays(model))}, {"metrics": {"loss": 0.5, "num-examples": 4}}, [], model
        )
        audit_reply({"statistics": statistics}, {"metrics": {"num-examples": 4}}, [], model)

    def test_an_image_beside_the_weights_is_refused(self, model: DADDA) -> None:
        shapes = shapes_of(state_dict_arrays(model)) | {"image": (1, 3, 64, 64)}
        with pytest.raises(RuntimeError, match=r"Refusing to send 'arrays'.*\('image', \(1, 3, 64, 64\)\)"):
            audit_reply({"arrays": shapes}, {}, [], model)

    def test_an_image_in_place_of_a_weight_of_the_same_name_is_refused(self, model: DADDA) -> None:
        shapes = shapes_of(state_dict_arrays(model))
        name = next(iter(shapes))
        shapes[name] = (1, 3, 64, 64)
        with pytest.raises(RuntimeError, match=f"Refusing to send 'arrays'.*{name}"):
            audit_reply({"arrays": shapes}, {}, [], model)

    def test_an_unknown_array_record_is_refused(self, model: DADDA) -> None:
        with pytest.raises(
            RuntimeError, match=r"Refusing to send array record .images.: only \[.arrays., .generator., .statistics.\]"
        ):
            audit_reply({"images": {"0": (3, 64, 64)}}, {}, [], model)

    def test_statistics_of_other_shapes_are_refused(self, model: DADDA) -> None:
        types, dim = model.model.type_weight.shape
        with pytest.raises(RuntimeError, match="Refusing to send 'statistics'"):
            audit_reply({"statistics": {"count": (types,), "total": (types, dim), "squares": (64, 64)}}, {}, [], model)

    def test_a_list_metric_is_refused(self, model: DADDA) -> None:
        with pytest.raises(RuntimeError, match=r"metrics \['pixels'\] of 'metrics': only single numbers"):
            audit_reply({}, {"metrics": {"loss": 0.1, "pixels": [0.1] * 12288}}, [], model)

    def test_a_defect_site_may_send_generator_weights_only(self, model: DADDA) -> None:
        generator = allowed_shapes(model)["generator"]
        audit_reply({"generator": generator}, {}, [], model, allowed_records={"generator"})
        with pytest.raises(RuntimeError, match=r"record 'arrays': only \['generator'\] may leave a site here"):
            audit_reply({"arrays": allowed_shapes(model)["arrays"]}, {}, [], model, allowed_records={"generator"})
        detector = {"model.detector.weight": (4, 4)}
        with pytest.raises(RuntimeError, match="Refusing to send 'generator'"):
            audit_reply({"generator": generator | detector}, {}, [], model, allowed_records={"generator"})

    def test_a_config_record_is_refused(self, model: DADDA) -> None:
        with pytest.raises(RuntimeError, match=r"Refusing to send config records \['extra'\]"):
            audit_reply({}, {}, ["extra"], model)

    def test_the_allowed_shapes_are_the_model_state_and_the_type_tables(self, model: DADDA) -> None:
        allowed = allowed_shapes(model)
        assert allowed["arrays"] == {name: shape or (1,) for name, shape in shapes_of(state_dict_arrays(model)).items()}
        assert allowed["generator"] == {k: v for k, v in allowed["arrays"].items() if k.startswith("model.generator.")}
        assert allowed["generator"] and not any("detector" in name for name in allowed["generator"])
        types, dim = model.model.type_weight.shape
        assert allowed["statistics"] == {"count": (types,), "total": (types, dim), "squares": (types, dim)}


class TestCredentials:
    def test_a_ca_a_server_certificate_for_the_hosts_and_one_key_pair_per_site(self, tmp_path: Path) -> None:
        output = make_credentials(tmp_path / "certs", ["server.example.com", "10.0.0.5"], ["line4", "line7"])
        assert sorted(path.name for path in output.iterdir()) == [
            "ca.crt",
            "ca.key",
            "line4.key",
            "line4.pub",
            "line7.key",
            "line7.pub",
            "server.key",
            "server.pem",
        ]
        ca = x509.load_pem_x509_certificate((output / "ca.crt").read_bytes())
        server = x509.load_pem_x509_certificate((output / "server.pem").read_bytes())
        server.verify_directly_issued_by(ca)
        names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == ["server.example.com", "localhost"]
        assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.5", "127.0.0.1"]
        key = serialization.load_ssh_private_key((output / "line4.key").read_bytes(), password=None)
        public = serialization.load_ssh_public_key((output / "line4.pub").read_bytes())
        assert key.public_key().public_numbers() == public.public_numbers()
        assert (output / "line4.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
        for private in ("ca.key", "server.key", "line4.key"):
            assert stat.S_IMODE((output / private).stat().st_mode) == 0o600

    def test_an_existing_folder_is_never_overwritten(self, tmp_path: Path) -> None:
        (tmp_path / "certs").mkdir()
        with pytest.raises(FileExistsError, match="already exists; choose a new folder"):
            make_credentials(tmp_path / "certs", [], ["line4"])

    @pytest.mark.parametrize("sites", [[], ["line 4"], ["a", "a"]])
    def test_bad_site_names_are_refused_and_nothing_is_written(self, tmp_path: Path, sites: list[str]) -> None:
        with pytest.raises(ValueError, match=r"[Ss]ite"):
            make_credentials(tmp_path / "certs", [], sites)
        assert list(tmp_path.iterdir()) == []
