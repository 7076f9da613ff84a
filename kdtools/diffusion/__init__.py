"""Diffusion step distillation (kd-diffstep): schedule algebra, SFDDM, baselines, samplers, data.

  schedules   pure noise-schedule algebra (sub-sequences, student schedule, posterior, DDIM step)
  teachers    diffusers-format model directories and the 2-D MLP denoiser
  training    the shared training loop (EMA, DDP) and the plain denoising loss
  sfddm       single-fold distillation (chapter 6) and input-noise selection
  baselines   DDIM step skipping, progressive distillation, from scratch
  sampling    DDPM (posterior) and DDIM samplers along a chain
  swissroll   the 2-D Swiss roll data and the sliced Wasserstein distance
"""
