/**
 * Errors in the wire shapes of each service, thrown by handlers and rendered in one place
 * (the app's error handler in app.ts) so the SDK surfaces the right exception class.
 */

/**
 * EBS direct API (REST-JSON): status + `x-amzn-ErrorType` header + `{"Message", "Reason"}` body.
 * Statuses follow the service model: ValidationException 400, AccessDeniedException 403,
 * ResourceNotFoundException 404, ConflictException 409, RequestThrottledException 400,
 * ConcurrentLimitExceededException 400, ServiceQuotaExceededException 402, InternalServerException 500.
 */
export class EbsError extends Error {
  constructor(
    readonly type: string,
    readonly status: number,
    message: string,
    readonly reason?: string,
  ) {
    super(message);
    this.name = type;
  }
}

export const ebsValidation = (message: string, reason = 'INVALID_PARAMETER_VALUE'): EbsError => new EbsError('ValidationException', 400, message, reason);
export const ebsNotFound = (id: string): EbsError =>
  new EbsError('ResourceNotFoundException', 404, `The snapshot '${id}' does not exist in this region; check the id`, 'SNAPSHOT_NOT_FOUND');

/** EC2 Query API: status + `<Response><Errors><Error><Code>` XML. */
export class Ec2Error extends Error {
  constructor(
    readonly code: string,
    message: string,
    readonly status = 400,
  ) {
    super(message);
    this.name = code;
  }
}
