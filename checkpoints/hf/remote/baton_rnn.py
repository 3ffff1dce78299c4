"""The elementwise recurrent mixers of an exported Baton model: the RG-LRU (letter R, model/rglru.py) and the
ParaRNN GRU and LSTM cells (letters U and L, model/pararnn.py; the LSTM in its three forms), each as the plain loop
over time in fp32.

Baton trains the ParaRNN cells by solving their T nonlinear steps together with Newton's method; the fixed
point it converges to is the cell stepped token by token, which is what runs here (and what Baton's own
decode step does).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .baton_layers import ShortConvolution

GATE_EXPONENT = 8.0  # the RG-LRU's c: log a_t = -c softplus(Lambda) r_t


class RGLRUMixer(nn.Module):
    """Griffin's recurrent block (De et al. 2024): out = o_proj(gelu(W_y x) * RG-LRU(conv(W_x x))), with
        r_t = sigmoid(W_a x_t + b_a),  i_t = sigmoid(W_i x_t + b_i)   (block-diagonal: one dense block per head)
        a_t = exp(-c softplus(Lambda) r_t),  h_t = a_t h_{t-1} + sqrt(1 - a_t^2) i_t x_t
    Its state is {"recurrent": h [B, width] fp32, "conv": the conv's window}."""

    def __init__(self, config, letter: str = "R"):
        super().__init__()
        baton = config.baton
        c, d = baton["rglru"], baton["d_model"]
        # RGLRUConfig.recurrent_width: 4/3 d_model rounded up to a multiple of 64 unless set.
        self.width = c["width"] if c["width"] is not None else 64 * -(-4 * d // (3 * 64))
        self.num_heads = c["num_heads"]
        self.head_dim = self.width // self.num_heads
        self.in_proj = nn.Linear(d, 2 * self.width, bias=False)  # the GeLU gate's W_y, then the branch's W_x
        self.conv = ShortConvolution(self.width, c["conv_size"], bias=True, activation=None)
        self.gate_weight = nn.Parameter(torch.zeros(self.num_heads, self.head_dim, 2 * self.head_dim))
        self.gate_bias = nn.Parameter(torch.zeros(self.num_heads, 2 * self.head_dim))
        self.Lambda = nn.Parameter(torch.zeros(self.width))
        self.o_proj = nn.Linear(self.width, d, bias=False)

    def forward(self, x: torch.Tensor, state: dict | None) -> tuple[torch.Tensor, dict]:
        state = state or {}
        B, T, _ = x.shape
        gate, branch = self.in_proj(x).chunk(2, dim=-1)
        branch, conv_window = self.conv(branch, state.get("conv"))
        branch = branch.float().view(B, T, self.num_heads, self.head_dim)
        gates = torch.sigmoid(torch.einsum("bthi,hij->bthj", branch, self.gate_weight.float()) + self.gate_bias.float())
        input_gate, recurrence_gate = gates.chunk(2, dim=-1)
        log_a = -GATE_EXPONENT * F.softplus(self.Lambda.float().view(self.num_heads, self.head_dim)) * recurrence_gate
        a = log_a.exp().flatten(-2)
        write = (torch.sqrt(-torch.expm1(2 * log_a)) * input_gate * branch).flatten(-2)  # expm1: exact as a_t -> 1

        h = state.get("recurrent")
        h = x.new_zeros(B, self.width, dtype=torch.float32) if h is None else h.float()
        outputs = []
        for t in range(T):
            h = a[:, t] * h + write[:, t]
            outputs.append(h)
        hs = torch.stack(outputs, 1) if outputs else write
        y = self.o_proj((F.gelu(gate.float(), approximate="tanh") * hs).to(x.dtype))
        return y, {"recurrent": h, "conv": conv_window}


def gru_step(h: torch.Tensor, p: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z = sigmoid(p_z + u_z h), r = sigmoid(p_r + u_r h), c = tanh(p_c + u_c (r h)), h_t = (1 - z) h + z c;
    (h_t, the output y_t = h_t)."""
    p_z, p_r, p_c = p.unbind(-2)
    u_z, u_r, u_c = u.unbind(0)
    z = torch.sigmoid(p_z + u_z * h)
    r = torch.sigmoid(p_r + u_r * h)
    c = torch.tanh(p_c + u_c * (r * h))
    h = h + z * (c - h)
    return h, h


def lstm_step(c: torch.Tensor, p: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gates read the cell state (peepholes; one state per channel): f, i = sigmoid(p + u c),
    g = tanh(p_g + u_g c), c_t = f c + i g; (c_t, the output y_t = sigmoid(p_o + u_o c_t) tanh(c_t))."""
    p_f, p_i, p_g, p_o = p.unbind(-2)
    u_f, u_i, u_g, u_o = u.unbind(0)
    f = torch.sigmoid(p_f + u_f * c)
    i = torch.sigmoid(p_i + u_i * c)
    g = torch.tanh(p_g + u_g * c)
    c = f * c + i * g
    return c, torch.sigmoid(p_o + u_o * c) * torch.tanh(c)


def lstm_hc_step(state: torch.Tensor, p: torch.Tensor, u: torch.Tensor,
                 coupled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The LSTM through h and c (model.pararnn.lstm = "hc"; state [..., 2] = (h, c)): f, i, o = sigmoid(p + u h),
    g = tanh(p_g + u_g h), c_t = f c + i g, h_t = o tanh(c_t); coupled ("cifg"): gates f, g, o and i = 1 - f.
    ((h_t, c_t), the output y_t = h_t)."""
    h, c = state.unbind(-1)
    if coupled:
        (p_f, p_g, p_o), (u_f, u_g, u_o) = p.unbind(-2), u.unbind(0)
    else:
        (p_f, p_i, p_g, p_o), (u_f, u_i, u_g, u_o) = p.unbind(-2), u.unbind(0)
    f = torch.sigmoid(p_f + u_f * h)
    i = 1 - f if coupled else torch.sigmoid(p_i + u_i * h)
    c = f * c + i * torch.tanh(p_g + u_g * h)
    h = torch.sigmoid(p_o + u_o * h) * torch.tanh(c)
    return torch.stack([h, c], -1), h


CELLS = {"U": (3, gru_step), "L": (4, lstm_step)}  # letter: (gates, step)
# model.pararnn.lstm other than "peephole" (state (h, c)): (gates, step)
LSTM_HC_CELLS = {"hc": (4, lstm_hc_step), "cifg": (3, lambda s, p, u: lstm_hc_step(s, p, u, coupled=True))}


class ParaRNNMixer(nn.Module):
    """A diagonal GRU (letter U) or LSTM (letter L) cell between in_proj (the gates' input terms p = W x + b for
    every gate) and o_proj; u = recurrent_weight holds one diagonal recurrent weight vector per gate. Its state
    is {"recurrent": h (GRU) or c (LSTM) [B, width] fp32}, or (h, c) [B, width, 2] for the LSTM through h and c."""

    def __init__(self, config, letter: str):
        super().__init__()
        baton = config.baton
        c, d = baton["pararnn"], baton["d_model"]
        lstm = c.get("lstm", "peephole")
        self.num_gates, self.step = LSTM_HC_CELLS[lstm] if letter == "L" and lstm != "peephole" else CELLS[letter]
        self.state_shape = (2,) if letter == "L" and lstm != "peephole" else ()
        self.width = c["width"] if c["width"] is not None else d  # ParaRNNConfig.recurrent_width
        self.in_proj = nn.Linear(d, self.num_gates * self.width, bias=False)
        self.recurrent_weight = nn.Parameter(torch.zeros(self.num_gates, self.width))
        self.gate_bias = nn.Parameter(torch.zeros(self.num_gates, self.width))
        self.o_proj = nn.Linear(self.width, d, bias=False)

    def forward(self, x: torch.Tensor, state: dict | None) -> tuple[torch.Tensor, dict]:
        state = state or {}
        B, T, _ = x.shape
        p = self.in_proj(x).float().unflatten(-1, (self.num_gates, self.width)) + self.gate_bias.float()
        u = self.recurrent_weight.float()
        h = state.get("recurrent")
        h = x.new_zeros(B, self.width, *self.state_shape, dtype=torch.float32) if h is None else h.float()
        outputs = []
        for t in range(T):
            h, y_t = self.step(h, p[:, t], u)
            outputs.append(y_t)
        ys = torch.stack(outputs, 1) if outputs else p.new_zeros(B, 0, self.width)
        return self.o_proj(ys.to(x.dtype)), {"recurrent": h}
