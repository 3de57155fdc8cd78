// The model shapes `ssmtune init` can write: the released Mamba-1 sizes and falcon-mamba-7b (REFERENCE.md
// §1), and tiny ones of each kind ("demo", "falcon-demo") for the demo and the tests.
#pragma once
#include <string>
#include <vector>

#include "framework/mamba_config.h"

namespace ssmtune {

std::vector<std::string> model_size_names();
MambaConfig model_size(const std::string& name);  // Error naming the size and the known ones

}  // namespace ssmtune
