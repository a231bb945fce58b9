"""The world model: encoders, RSSM (block GRU + categorical latents), decoders, reward and
continue heads, and its loss.

Shapes: B batch, T time, N = flattened batch, L latents, K classes per latent.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from engine import dists
from engine.config import Config
from engine.nets import (
    MLP,
    BlockGRU,
    ImageDecoder,
    ImageEncoder,
    Linear,
    RMSNorm,
    WeightGradTap,
    cnn_channels,
    hold_settings,
    hold_space,
    tapped_linear,
)


class WorldModel(nn.Module):
    def __init__(
        self,
        cfg: Config,
        vector_dim: int,
        num_actions: int,
        kernels: str = "torch",
        batched_wgrad: bool = False,
        member: bool = False,
        space_flag: bool = False,
    ):
        """`member`: a population member's model, its per-member settings held as tensors
        (`hold_settings`); `space_flag`: its two-hot space too (`hold_space`)."""
        super().__init__()
        self.kernels, self.batched_wgrad = kernels, batched_wgrad
        m, t = cfg.models, cfg.train
        mlp, cnn = m.encoder.mlp, m.encoder.cnn
        self.L, self.K = mlp.latents, mlp.latent_categories
        self.deter, self.stoch = cfg.deter, cfg.stoch
        self.num_actions = num_actions
        # The loss weights and latent settings, which a population's members may each set.
        scales = ("beta_pred", "beta_dyn", "beta_rep", "image_scale", "vector_scale")
        scales += ("reward_scale", "cont_scale")
        settings = {k: getattr(t, k) for k in scales}
        hold_settings(self, dict(settings, unimix=m.unimix, free_bits=m.free_bits), member)
        self.use_image, self.use_vector = cfg.env.image, cfg.env.vector
        self.reward_detached = t.reward_head_detached
        hold_space(self, m.twohot_space, space_flag)
        init = m.init
        units, size = m.d_hidden, cnn.target_size[0]
        feat = self.deter + self.stoch
        token_dim = 0
        if self.use_image:
            channels = cnn_channels(units, cnn.num_layers)
            self.image_encoder = ImageEncoder(channels, cnn.kernel_size, size)
            self.image_decoder = ImageDecoder(
                self.deter,
                self.stoch,
                units,
                channels,
                cnn.kernel_size,
                size,
                sigmoid=cnn.activation == "sigmoid",
                init=init,
            )
            token_dim += self.image_encoder.out_dim
        if self.use_vector:
            self.vector_encoder = MLP(vector_dim, units, mlp.n_layers, init=init)
            self.vector_decoder = MLP(feat, units, mlp.n_layers, vector_dim, init=init)
            token_dim += units
        self.core = BlockGRU(
            self.deter, self.stoch, num_actions, units, m.rnn.n_blocks, kernels, init
        )
        # The posterior's first layer acts on concat(deter, token); it is split in two so the
        # token half runs once over all T steps (in `encode`) instead of inside the observe loop,
        # where each step would also write its own full-size weight gradient. Both halves are
        # initialised with the fan-in of the whole layer.
        fan_in = self.deter + token_dim
        self.post_token = Linear(token_dim, units, bias=False, init=init, fan_in=fan_in)
        self.post_deter = Linear(self.deter, units, init=init, fan_in=fan_in)
        self.post_out = nn.Sequential(
            RMSNorm(units), nn.SiLU(), Linear(units, self.stoch, init=init)
        )
        self.prior_net = MLP(self.deter, units, 2, self.stoch, init=init)
        # Zero-initialised outputs (official outscale 0): random initial reward predictions are
        # how dream values explode (the archive saw 8.9e7).
        self.reward_head = MLP(feat, units, m.head_layers, m.num_bins, outscale=0.0, init=init)
        self.cont_head = MLP(feat, units, m.head_layers, 1, init=init)
        self.register_buffer(
            "bins", dists.make_bins(m.num_bins, space=m.twohot_space), persistent=False
        )

    # ---- RSSM -------------------------------------------------------------------------------

    def initial(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        return (
            torch.zeros(n, self.deter, device=device),
            torch.zeros(n, self.L, self.K, device=device),
        )

    def encode(self, obs: dict[str, Tensor]) -> Tensor:
        """Observations with leading dims (...) -> tokens (..., units): the embedding, already
        through the token half of the posterior's first layer."""
        parts = []
        if self.use_image:
            img = obs["image"]
            lead = img.shape[:-3]
            parts.append(self.image_encoder(img.reshape(-1, *img.shape[-3:])).reshape(*lead, -1))
        if self.use_vector:
            parts.append(self.vector_encoder(dists.symlog(obs["vector"])))
        return self.post_token(torch.cat(parts, -1))

    def _latent(self, logits: Tensor) -> Tensor:
        return dists.sample_onehot(dists.unimix_probs(logits, self.unimix))

    def obs_step(
        self, deter: Tensor, stoch: Tensor, prev_action: Tensor, token: Tensor, is_first: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Posterior step. The carry and previous action are zeroed where an episode starts."""
        return self.obs_step_tapped(deter, stoch, prev_action, token, is_first, None)[:3]

    def obs_step_tapped(
        self,
        deter: Tensor,
        stoch: Tensor,
        prev_action: Tensor,
        token: Tensor,
        is_first: Tensor,
        taps: dict[str, Tensor] | None,
    ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """`obs_step` with WeightGradTap taps (keys of `tap_layers`); also returns the tapped
        layers' inputs."""
        keep = (~is_first).to(deter.dtype).unsqueeze(-1)
        deter, prev_action = deter * keep, prev_action * keep
        stoch = stoch * keep.unsqueeze(-1)
        deter, inputs = self.core.tapped(deter, stoch.flatten(-2), prev_action, taps)
        deter = deter.float()
        taps = taps or {}
        h = tapped_linear(self.post_deter, deter, taps.get("post_deter")) + token
        h = self.post_out[1](self.post_out[0](h))
        logits = tapped_linear(self.post_out[2], h, taps.get("post_out"))
        if taps:
            inputs["post_deter"], inputs["post_out"] = deter, h
        logits = logits.float().unflatten(-1, (self.L, self.K))
        return deter, self._latent(logits), logits, inputs

    def tap_layers(self) -> dict[str, tuple[Tensor, int, int]]:
        """The observe loop's layers whose weight gradients `batched_wgrad` forms once per
        sequence: name -> (weight, output width, blocks; 0 = dense)."""
        return {
            **self.core.tap_layers(),
            "post_deter": (self.post_deter.weight, self.post_deter.out_features, 0),
            "post_out": (self.post_out[2].weight, self.post_out[2].out_features, 0),
        }

    def img_step(self, deter: Tensor, stoch: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        """Prior step: imagine the next state from the action alone."""
        deter = self.core(deter, stoch.flatten(-2), action).float()
        return deter, self._latent(self.prior_logits(deter))

    def prior_logits(self, deter: Tensor) -> Tensor:
        # The recurrent state and latent logits stay fp32 under bf16 autocast: the carry keeps
        # one dtype (no recompiles), and KL and sampling keep their precision.
        return self.prior_net(deter).float().unflatten(-1, (self.L, self.K))

    def observe(
        self,
        tokens: Tensor,
        actions: Tensor,
        is_first: Tensor,
        start: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Posterior over a sequence. tokens (B, T, E), actions (B, T, A) one-hot (the action
        taken AT each step), is_first (B, T). `start` = (deter, stoch, action) of the step before
        the sequence (replay context); without it the sequence starts from a zero state.
        Returns deter (B, T, D), stoch (B, T, L, K), logits (B, T, L, K)."""
        B, T = is_first.shape
        if start is None:
            deter, stoch = self.initial(B, tokens.device)
            prev_action = torch.zeros_like(actions[:, 0])
            # Each sampled sequence starts from a zero state, as if an episode began there.
            is_first = is_first.clone()
            is_first[:, 0] = True
        else:
            deter, stoch, prev_action = start
        if torch.is_grad_enabled() and not deter.requires_grad:
            # Every later step's carry requires grad: the first step's does too, so a compiled
            # obs_step is one graph, not a second one for a carry without grad (its guard).
            # The leaf's own gradient is a (B, D) by-product; the weights' are unchanged.
            deter = deter.detach().requires_grad_()
            stoch = stoch.detach().requires_grad_()
        # Each step's action as a contiguous (B, A) block, strided as the first step's zeros or
        # context action: a compiled obs_step's stride guard holds for every step.
        step_actions = actions.transpose(0, 1).contiguous()
        deters, stochs, logits = [], [], []
        taps = inputs = None
        if self.batched_wgrad and torch.is_grad_enabled():
            dev = tokens.device.type
            dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
            inputs = {name: [] for name in self.tap_layers()}
            taps = {
                name: WeightGradTap.apply(w, inputs[name], (T, B, width), dtype or w.dtype, g)
                for name, (w, width, g) in self.tap_layers().items()
            }
        for t in range(T):
            if taps is None:
                deter, stoch, logit = self.obs_step(
                    deter, stoch, prev_action, tokens[:, t], is_first[:, t]
                )
            else:
                deter, stoch, logit, xs = self.obs_step_tapped(
                    deter,
                    stoch,
                    prev_action,
                    tokens[:, t],
                    is_first[:, t],
                    {k: v[t] for k, v in taps.items()},
                )
                for k, x in xs.items():
                    inputs[k].append(x)
            prev_action = step_actions[t]
            deters.append(deter)
            stochs.append(stoch)
            logits.append(logit)
        return torch.stack(deters, 1), torch.stack(stochs, 1), torch.stack(logits, 1)

    @staticmethod
    def feat(deter: Tensor, stoch: Tensor) -> Tensor:
        return torch.cat([deter, stoch.flatten(-2)], -1)

    def reward(self, feat: Tensor) -> Tensor:
        """Predicted reward (the reward head's two-hot expectation), fp32."""
        return dists.twohot_mean(self.reward_head(feat).float(), self.bins, self.space)

    def decode_vector(self, feat: Tensor) -> Tensor:
        """The state vector the decoder reads from `feat` (env.vector), in real units, fp32."""
        return dists.symexp(self.vector_decoder(feat).float())

    def cont_prob(self, feat: Tensor) -> Tensor:
        """Predicted probability that the episode continues, fp32: in bf16 a probability of
        0.998 rounds to 0.996, a step as large as 1 - gamma."""
        return torch.sigmoid(self.cont_head(feat).squeeze(-1).float())

    # ---- Loss -------------------------------------------------------------------------------

    def loss(
        self, batch: dict[str, Tensor], start: tuple[Tensor, Tensor, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor], tuple[Tensor, Tensor]]:
        """World-model loss on a replay batch (B, T, ...), from `start` (see `observe`). Returns
        the scalar loss, metrics (0-dim tensors, still on the device) and the posterior (deter,
        stoch), for imagination starts."""
        actions = dists.onehot(batch["action"], self.num_actions)
        tokens = self.encode(batch)
        deter, stoch, post_logits = self.observe(tokens, actions, batch["is_first"], start)
        total, metrics = self.loss_terms(batch, deter, stoch, post_logits)
        return total, metrics, (deter.detach(), stoch.detach())

    def loss_terms(
        self, batch: dict[str, Tensor], deter: Tensor, stoch: Tensor, post_logits: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Decoders, heads and KL over the whole posterior sequence: one static-shape graph
        (compiled on the fast path) after the step-by-step observe loop."""
        sc = self
        prior_logits = self.prior_logits(deter)  # the prior needs only deter: one batched call
        dyn, rep, kl = dists.kl_losses(post_logits, prior_logits, self.unimix, self.free_bits)
        feat = self.feat(deter, stoch)
        metrics: dict[str, Tensor] = {}
        # Prediction terms, each (B, T). Images and vectors are SUMMED over pixels/dims (official
        # scale); the per-pixel mean is reported so it compares with the archive's 0.008-0.014.
        pred = torch.zeros_like(dyn)
        if self.use_image:
            recon = self.image_decoder(deter.flatten(0, 1), stoch.flatten(0, 1).flatten(-2))
            target = batch["image"].flatten(0, 1).permute(0, 3, 1, 2).float() / 255.0
            sq = (recon - target).square()
            pred = pred + sc.image_scale * sq.sum((1, 2, 3)).reshape(dyn.shape)
            metrics["image_loss"] = sq.mean().detach()
        if self.use_vector:
            sq = (self.vector_decoder(feat) - dists.symlog(batch["vector"])).square()
            pred = pred + sc.vector_scale * sq.sum(-1)
            metrics["vector_loss"] = sq.mean().detach()
        rew_logits = self.reward_head(feat.detach() if self.reward_detached else feat)
        reward_loss = dists.twohot_loss(
            rew_logits, batch["reward"], self.bins, impl=self.kernels, space=self.space
        )
        cont_target = (~batch["is_terminal"]).float()
        cont_logit = self.cont_head(feat).squeeze(-1).float()
        cont_loss = -dists.bernoulli_logprob(cont_logit, cont_target)
        pred = pred + sc.reward_scale * reward_loss + sc.cont_scale * cont_loss
        total = (sc.beta_pred * pred + sc.beta_dyn * dyn + sc.beta_rep * rep).mean()
        floor = dists.twohot_floor(batch["reward"], self.bins, self.space)
        metrics.update(
            wm_loss=total.detach(),
            reward_loss=reward_loss.mean().detach(),
            reward_loss_excess=(reward_loss - floor).mean().detach(),
            continue_loss=cont_loss.mean().detach(),
            kl_dyn=dyn.mean().detach(),
            kl_rep=rep.mean().detach(),
            kl=kl.mean(),
            post_entropy=dists.categorical_entropy(
                dists.unimix_logits(post_logits.detach(), self.unimix)
            )
            .sum(-1)
            .mean(),
            prior_entropy=dists.categorical_entropy(
                dists.unimix_logits(prior_logits.detach(), self.unimix)
            )
            .sum(-1)
            .mean(),
        )
        return total, metrics
