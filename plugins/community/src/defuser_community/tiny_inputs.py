"""Forward inputs for tiny Dia and ESMFold2 models, which token ids alone cannot drive: named by the
``inputs`` of this plugin's ``TinyModel`` recipes, imported only when used."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["dia_decoder_inputs", "dia_inputs", "esmfold2_inputs"]


def dia_inputs(model: nn.Module, batch: int, length: int, generator: torch.Generator) -> dict[str, Any]:
    # Text ids for the encoder, (batch, length, channels) audio codes for the decoder.
    config = model.config
    decoder = config.decoder_config
    text = torch.randint(0, config.encoder_config.vocab_size, (batch, length), generator=generator)
    codes = torch.randint(0, decoder.vocab_size, (batch, length, decoder.num_channels), generator=generator)
    return {"input_ids": text, "attention_mask": torch.ones_like(text), "decoder_input_ids": codes}


def dia_decoder_inputs(model: nn.Module, batch: int, length: int, generator: torch.Generator) -> dict[str, Any]:
    config = model.config
    codes = torch.randint(0, config.vocab_size, (batch, length, config.num_channels), generator=generator)
    encoded = torch.randn(batch, length, config.cross_hidden_size, generator=generator)
    return {"input_ids": codes, "encoder_hidden_states": encoded}


def esmfold2_inputs(model: nn.Module, batch: int, length: int, generator: torch.Generator) -> dict[str, Any]:
    # One protein chain of ``length`` residues with two reference atoms each; no MSA, no language model.
    from transformers.models.esmfold2.modeling_esmfold2 import EsmFold2AtomInputs

    config = model.config
    atoms = 2 * length
    positions = torch.arange(length).expand(batch, length)
    zeros = torch.zeros(batch, length, dtype=torch.long)
    atom_to_token = torch.arange(length).repeat_interleave(2).expand(batch, atoms)
    atom_inputs = EsmFold2AtomInputs(
        ref_pos=torch.randn(batch, atoms, 3, generator=generator),
        ref_charge=torch.zeros(batch, atoms),
        atom_attention_mask=torch.ones(batch, atoms, dtype=torch.bool),
        ref_element=torch.randint(1, config.max_atomic_number, (batch, atoms), generator=generator),
        ref_atom_name_chars=torch.randint(
            0, config.char_vocab_size, (batch, atoms, config.max_chars), generator=generator
        ),
        ref_space_uid=atom_to_token.clone(),
        atom_to_token=atom_to_token.clone(),
    )
    return {
        "token_index": positions.clone(),
        "residue_index": positions.clone(),
        "asym_id": zeros,
        "sym_id": zeros.clone(),
        "entity_id": zeros.clone(),
        "mol_type": zeros.clone(),
        "res_type": torch.randint(0, 20, (batch, length), generator=generator),
        "token_bonds": torch.zeros(batch, length, length, 1),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
        "atom_inputs": atom_inputs,
    }
