import pytest


@pytest.fixture(scope="session")
def toy_blip_folder(tmp_path_factory):
    from tests.rewards.toy_captioner import save_toy_blip

    return save_toy_blip(tmp_path_factory.mktemp("toy_blip"))
