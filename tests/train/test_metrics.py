from pretrain.train.metrics import console_line, step_scalars


def test_console_line_shows_the_caption_word_loss_only_when_it_is_trained():
    values = {"loss": 3.5, "loss_itc": 1.0, "loss_itm": 0.5, "loss_mlm": 2.0, "itm_accuracy": 0.75}
    off = console_line(7, 10, step_scalars({**values, "loss_words": 0.0}, 1e-3, 2.0))
    on = console_line(7, 10, step_scalars({**values, "loss_words": 1.25}, 1e-3, 2.0))
    assert off == "step 7/10 | total 3.5 | itc 1 | itm 0.5 | mlm 2 | itm_accuracy 0.75 | lr 0.001 | grad_norm 2"
    assert on == off.replace("mlm 2 |", "mlm 2 | words 1.25 |")
