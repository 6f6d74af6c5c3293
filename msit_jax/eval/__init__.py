"""Evaluation: the reference protocol (`protocol`), predictors (`predictors`), the one
evaluation path shared by evaluate.py and training (`runner`), `--data` names
(`datasets`), outputs (`reports`), PSNR / SSIM (`metrics`, `color`), MATLAB bicubic
(`matlab_resize`) and the command line (`cli`)."""
