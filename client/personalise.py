"""Local fine-tuning before evaluation (`train.personalise = finetune`, fedir.models).

The site trains the global model it received for one round's local budget on its own
training rows and scores that copy on its test patients; the copy is never sent and is
dropped after scoring, so the federation itself is unchanged. Every evaluation round does
this, so the per-round history of a fine-tuned run is consistently the personalised
model's, and the last round's is "local fine-tuning from the final global model".
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context
from torch import nn

from fedir.client.arms import unlabelled_rows
from fedir.client.inputs import SiteView
from fedir.client.local_training import local_rows, round_recipe
from fedir.client.training import pick_device, train
from fedir.config import Settings
from fedir.protocol import decode_round_config

FINETUNE_SEED_OFFSET = 500  # fine-tuning draws batches apart from the round's training


def personalised(model: nn.Module, settings: Settings, site: SiteView, config: ConfigRecord,
                 context: Context) -> nn.Module:
    """The model this site scores: fine-tuned in place under `finetune`, else as received."""
    if settings.train_personalise != "finetune":
        return model
    server_round = decode_round_config(config).server_round
    seed = settings.round_seed(server_round) + FINETUNE_SEED_OFFSET
    x, y, _ = local_rows(settings, site, config, context, seed)
    objective, recipe = round_recipe(settings, seed, server_round)
    train(model, x, y, objective, recipe, pick_device(), unlabelled_rows(settings, site, context))
    return model
