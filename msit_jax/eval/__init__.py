"""Evaluation: the reference protocol, PSNR / SSIM, MATLAB bicubic, reports."""
