import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    # The test machine is shared: one thread per test process avoids oversubscription stalls.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def toy_blip_folder(tmp_path_factory):
    from realign_pipeline.rewards.toy_captioner import save_toy_blip

    return save_toy_blip(tmp_path_factory.mktemp("toy_blip"))
