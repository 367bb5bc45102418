"""Settings shared by the test modules that train for real on a CIFAR-10 subset."""

import torch

from ssl_sec.config import Config, from_dict

# ResNet-18 with the ImageNet stem at 32x32 keeps these runs to seconds on two cores.
SMALL = ["data.train_subset=512", "data.test_subset=200", "model.cifar_stem=false",
         "model.proj_hidden_dim=128", "model.proj_output_dim=32", "optim.batch_size=128",
         "optim.name=sgd", "optim.lr=0.1", "optim.warmup_epochs=0.5", "eval.knn_every=1",
         "eval.knn_k=20", "log_every=2", "ckpt_every=1"]


def small_cfg(tmp_path, *extra: str) -> Config:
    """A 2-epoch run of SMALL in tmp_path; `extra` are dotted overrides."""
    return from_dict({}, SMALL + [f"out_dir={tmp_path}", "optim.epochs=2", *extra])


@torch.no_grad()
def queue_keys(moco) -> torch.Tensor:
    """A MoCo queue's stored keys, oldest first. Shape (min(steps * B, K), d)."""
    n = int(moco.queue_len)
    if n < moco.queue.shape[0]:
        return moco.queue[:n].clone()
    return torch.roll(moco.queue, -int(moco.queue_ptr), dims=0)
