/* The cluster where weightd was built without UCX, OpenSSL or libxxhash:
 * [cluster] is refused when the daemon starts. */
#include <errno.h>

#include "cluster/cluster.h"

void cluster_resolved(ClusterResolve *req, int r, const WdError *err, const Component *comp, int root_fd) {
}

int cluster_new(Cluster **ret, uv_loop_t *loop, Store *store, const ClusterParams *p, const ClusterOps *ops,
                void *userdata, void *closed_userdata, WdError *err) {
        return wd_error_set(err, -EOPNOTSUPP, "[cluster]: weightd was built without UCX, OpenSSL or libxxhash");
}

Cluster *cluster_free(Cluster *c) {
        return NULL;
}

int cluster_reconfigure(Cluster *c, const ClusterParams *p, WdError *err) {
        return wd_error_set(err, -EOPNOTSUPP, "[cluster]: weightd was built without UCX, OpenSSL or libxxhash");
}

void cluster_set_device_tier(Cluster *c, DeviceTier *tier) {
}

int cluster_prefetch(Cluster *c, const Component *comp, char *const *nodes, ShardSpec *const *specs,
                     const int *devices, size_t n_nodes, int device, Job **ret, WdError *err) {
        return wd_error_set(err, -EOPNOTSUPP, "weightd was built without the cluster");
}

int cluster_fetch(Cluster *c, const Component *comp, int root_fd, Job **ret, WdError *err) {
        *ret = NULL;
        return 0;
}

int cluster_get_status(Cluster *c, ClusterStatus *ret) {
        return -EOPNOTSUPP;
}
