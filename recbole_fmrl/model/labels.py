"""Which hidden states a sequential model trains on, and their next-item labels."""


def labelled_states(model, interaction, states, last_states, align_targets):
    """``(hidden [P d], labels [P])`` of one training batch.

    ``all_positions`` windows carry a next-item label for every position (``model.target_list_field``,
    0 = no label): every labelled state trains. RecBole's prefix-augmented samples carry one label
    (``POS_ITEM_ID``) for the last state. ``align_targets`` maps the ``[B L]`` label matrix onto the
    layout of ``states`` (packed real tokens, or left-aligned positions).
    """
    field = model.target_list_field
    if field is not None and field in interaction:
        targets = align_targets(interaction[field])
        labelled = targets > 0
        return states[labelled], targets[labelled]
    return last_states, interaction[model.POS_ITEM_ID]
