// Per-ISA CPU entry points of GroupNorm(+SiLU) (see dispatch.h).
#pragma once

#include "cpu/dispatch.h"
#include "sgdm/group_norm_args.h"

SGDM_CPU_DECLARE(void, group_norm_silu_fwd_kernel, (const ::sgdm::GroupNormFwdArgs& args))
SGDM_CPU_DECLARE(void, group_norm_silu_bwd_kernel, (const ::sgdm::GroupNormBwdArgs& args))
