#include "distributed/communicator.h"

#include "distributed/mpi_communicator.h"
#include "framework/error.h"
#ifdef SSMTUNE_WITH_NCCL
#include "distributed/nccl_communicator.h"
#endif

namespace ssmtune {

size_t element_size(Element element) {
  switch (element) {
    case Element::f32: return 4;
    case Element::f64: case Element::i64: case Element::u64: return 8;
    case Element::byte: return 1;
  }
  return 1;
}

std::unique_ptr<Communicator> make_communicator(const ProcessGroup& group, Watchdog& watchdog, Communicator& host,
                                                void* compute_stream) {
  if (compute_stream == nullptr || group.size() == 1) return std::make_unique<MpiCommunicator>(group, watchdog);
#ifdef SSMTUNE_WITH_NCCL
  return make_nccl_communicator(group, watchdog, host, compute_stream);
#else
  (void)host;
  fail("{} ranks on GPUs need NCCL, and this build of ssmtune has none (nccl.h and libnccl were not found when it "
       "was configured); install NCCL and rebuild, or use device=cpu",
       group.size());
#endif
}

}  // namespace ssmtune
